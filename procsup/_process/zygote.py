"""Lean process starts: a preloaded zygote that forks tasks, and a direct fork.

::

    supervisor process                                zygote  (python -c "...serve()", spawned once)
    ──────────────────                                ───────────────────────────────────────────
    ZygoteProcess.start()                             single-threaded; procsup, the preload list
      pickle (target, args) while "spawning",         and the task modules it trusts imported
      by reference or by value (reduction):
      tokens, Connections ─ DupFd ─▶ FdRef(index)
      status pipe: keep r, send w
      Spawn(...) + fds ───────────── sendmsg ───────▶ recvmsg: the Spawn and its fds (SCM_RIGHTS)
                                                      procsup's needs and the preload list; the
                                                      task's module only once a trial proved it
                                                      safe here (``procsup._process.trials``)
      Started(pid) ◀────────────────── reply ───────  keep the status write end; the task is
                                                      the spare, forked ahead and waiting:
                                                      forward the datagram + fds ──▶ spare:
                                                               load_payload, target(*args), _exit
                                                      (no spare: fork ──▶ child: the same)
    sentinel = r: readable when the zygote ◀──────── SIGCHLD ▶ waitpid ▶ write the exit code,
      has reaped the task (or died itself)              close that task's status write end,
                                                        then the write ends of its pipes to
                                                        the supervisor it held (Spawn.held)

The messages and the fds each carries are in ``procsup._process.messages``.

Every child first closes the zygote's fds and makes the task's stderr pipe its fd 2, so a failure
to import the task's module or unpickle its arguments reaches the crash record's stderr tail. The
spare (``procsup._process.server``) keeps ``fork()`` off a start's critical path; the next one is
forked once a task exits, or 5 ms after the start.

``ZygoteProcess(fresh=True)`` is ``start_method="spawn"``: the payload also carries the interpreter,
the environment and multiprocessing's spawn preparation data; the zygote forks a child that execs
python (``procsup._process.spawned``), so the zygote is the parent of spawn tasks too.

``ForkProcess`` is the same contract for ``start_method="fork"``: ``os.fork()`` in the caller makes
a shim, a subreaper that forks the task and reports its end on a status pipe as the zygote does
(``procsup._process.shim``); the supervision thread reaps the shim once it has disposed of the
task's orphans, and the zygote guards it.

Both are ``multiprocessing.Process`` look-alikes (``start``, ``pid``, ``sentinel``, ``join``,
``exitcode``, ``close``), so the supervisor treats every start method alike. Both children finish
with ``os._exit``: the target (``procsup._process.entry.main``) reports the task's outcome itself.

Things that don't work
----------------------
- ``multiprocessing``'s forkserver, even preloaded: measured here at ~13 ms a start, 3.5x pebble's
  fork-per-call, because every child re-runs spawn's preparation (``sys.path``, the ``__main__``
  module) and the server reads its preload list only once. The zygote imports a task's module
  once a trial child imported it cleanly and fast, so later starts fork it ready-made.
- ``multiprocessing``'s fork ``Process``: its child bootstrap (``Process._bootstrap``) costs more
  than the task for trivial work; ``ForkProcess`` keeps only the after-fork hooks objects rely on.
- Learning of a zygote child's death from anything the child holds: its grandchildren inherit it.
  The status pipe's write end stays in the zygote, and every child closes its copy at once.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing.context
import multiprocessing.process
import multiprocessing.reduction
import multiprocessing.spawn
import multiprocessing.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from procsup._os import tree as _contain
from procsup._os.fds import MAX_FDS, read_exactly, send_fds, wait_readable, write_all
from procsup._os.forking import RECORDER, thread_repair
from procsup._os.tree import ExitInfo
from procsup._process import shim as _shim
from procsup._process.guardian import STATUS, decode_status
from procsup._process.messages import (
    FdRef,
    FreshStart,
    Guard,
    Preload,
    Preloaded,
    Reply,
    Request,
    Spawn,
    Started,
    StartFailed,
    Sync,
    Ward,
    decode_reply,
)
from procsup._process.reduction import UnpicklableError, value_pickler
from procsup._token.token import CancellationToken, borrow_args

__all__ = [
    "ForkProcess",
    "Shim",
    "ZygoteProcess",
    "daemon_fds",
    "guard",
    "import_modules",
    "lead_own_process_group",
    "preload",
    "run_target",
    "shutdown",
    "uninterrupted",
    "zygote_pids",
]

_INLINE = 64 * 1024  # larger payloads travel in a memfd, not in the datagram
_SHIM_KILL_WAIT = 5.0  # seconds a SIGKILLed shim gets to exit before it is left unreaped
_STARTING = threading.Lock()  # held from making a child's pipe to closing our copy of its end


def run_target(target: Callable[..., Any], args: Sequence[Any]) -> int:
    try:
        target(*args)
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must end with _exit whatever happens
        import traceback

        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()


class _LeanProcess:
    """What the supervisor needs of a process; ``exitcode`` as in multiprocessing (-N: signal N)."""

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], name: str = "") -> None:
        self._target = target
        self._args = args
        self.name = name
        self._fds: list[int] = []
        self.pid: int | None = None
        self.sentinel = -1
        self.info: ExitInfo | None = None  # set once reaped: exit code, core, peak RSS, CPU

    @property
    def exitcode(self) -> int | None:
        return None if self.info is None else self.info.exitcode

    def join(self, timeout: float | None = None) -> None:
        # Without a timeout, the read itself waits (the status pipe blocks): no poll first, which
        # the supervision thread would pay on the way from a crash to the parent's cancellation.
        if self.info is None and (timeout is None or wait_readable([self.sentinel], timeout)):
            self.info = self._collect()

    def is_alive(self) -> bool:
        return self.info is None and not wait_readable([self.sentinel], 0)

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1

    def _collect(self) -> ExitInfo:
        # The status pipe: the zygote, or a fork task's shim, writes the status once it has reaped.
        data = os.read(self.sentinel, STATUS.size)
        if len(data) < STATUS.size:
            # The zygote or shim itself died, and the task with it (PR_SET_PDEATHSIG): the status
            # is lost.
            return ExitInfo(-signal.SIGKILL)
        info: ExitInfo = decode_status(data)
        return info

    # multiprocessing.reduction.DupFd calls these while we pickle (we are the "spawning popen").
    def duplicate_for_child(self, fd: int) -> int:
        self._fds.append(fd)
        return len(self._fds) - 1

    DupFd = FdRef


class ForkProcess(_LeanProcess):
    """A fork of this process, through a shim that stays its parent (``procsup._process.shim``); the
    sentinel is the status pipe, on which the shim reports the task's end as the zygote does."""

    def __init__(
        self, target: Callable[..., Any], args: tuple[Any, ...], name: str = "", grace: float = 5.0
    ) -> None:
        super().__init__(target, args, name)
        self._grace = grace  # how long the shim lets the task's orphans live after it
        self.shim: Shim | None = None  # until the supervision thread takes it over
        self._write_end = -1  # the status pipe's, until the shim has it

    def start(self) -> None:
        pid = 0
        mask: set[int | signal.Signals] | None = None
        try:  # from the first fd on, anything raised (Ctrl-C included) undoes the start
            with _STARTING:  # no fork of ours in another thread copies our write end
                # Every signal blocked across the fork: the shim starts with them blocked, and
                # so does any thread a user's at-fork hook starts in it (one that took SIGCHLD
                # would leave the shim waiting forever); the shim gives the task ``mask`` back.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                self.sentinel, self._write_end = os.pipe2(os.O_CLOEXEC)
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the shim never returns
                    code = 1
                    try:
                        code = _shim.serve(
                            self._write_end, self._grace, mask, run_target, *self._work()
                        )
                    finally:
                        os._exit(code)
                os.close(self._write_end)
                self._write_end = -1
                with contextlib.suppress(ProcessLookupError):  # SIGCHLD ignored: reaped already
                    self.shim = Shim(pid)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # runs a pending Ctrl-C handler
            mask = None
            data = read_exactly(self.sentinel, _shim.PID.size)
            task = _shim.PID.unpack(data)[0] if len(data) == _shim.PID.size else 0
            if task < 0:
                raise OSError(-task, f"procsup could not fork the task: {os.strerror(-task)}")
            if task == 0:
                raise RuntimeError("procsup's fork shim exited before it could fork the task")
        except BaseException:
            uninterrupted(lambda: self._abandon(pid))
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        self.pid = task

    def _work(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        os.close(self.sentinel)  # in the shim: the read end is the supervisor's
        return self._target, self._args

    def _abandon(self, shim: int) -> None:
        """Undo a start that failed or was interrupted: kill and reap the shim ``shim`` (0: not
        forked) with what it holds, close every fd. Idempotent."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        if shim and self.shim is None:  # no pidfd: only a child not reaped yet may be signalled
            with contextlib.suppress(OSError):  # ChildProcessError: SIGCHLD ignored, or reaped
                if not os.waitid(os.P_PID, shim, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    os.kill(shim, signal.SIGKILL)
                os.waitpid(shim, 0)
        self.close()

    def close(self) -> None:
        """Close the sentinel; kill and reap the shim, with what it holds, unless the
        supervision thread took it over (idempotent, so an interrupted close can be retried)."""
        super().close()
        shim = self.shim
        if shim is not None:  # nobody took it over: the task has ended or never started
            shim.kill()
            if not shim.reap(_SHIM_KILL_WAIT):
                shim.drop()
            self.shim = None


def uninterrupted(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` to its end: a Ctrl-C (KeyboardInterrupt) meanwhile restarts it, so a
    second Ctrl-C cannot leave a task running unsupervised. ``cleanup`` must be idempotent."""
    while True:
        try:
            cleanup()
            return
        except KeyboardInterrupt:
            continue


class Shim:
    """The supervisor's hold on a fork task's shim: it must be reaped, and it may be killed with
    everything it still holds (the task's orphans, or the task)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)  # readable once it has exited

    def reap(self, timeout: float | None = 0) -> bool:
        """Reap the shim if it exits within ``timeout`` seconds (None: wait); close the pidfd."""
        if self.fd < 0:
            return True
        if not wait_readable([self.fd], timeout):
            return False
        with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: the kernel reaped it
            os.waitid(os.P_PIDFD, self.fd, os.WEXITED)
        os.close(self.fd)
        self.fd = -1
        return True

    def kill(self) -> None:
        """SIGKILL the shim and its tree, frozen first (``procsup._os.tree.kill_trees``), unless
        its pidfd says it has exited (psutil checks start times against a reused pid too)."""
        if self.fd >= 0 and not wait_readable([self.fd], 0):
            with contextlib.suppress(psutil.Error):
                _contain.kill_trees([psutil.Process(self.pid)])

    def drop(self) -> None:
        """Give up on a shim that does not exit: close the pidfd, leave it unreaped."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ZygoteProcess(_LeanProcess):
    """A child forked by the zygote; ``preload`` names modules the zygote imports first,
    ``module`` the task's own, which the zygote imports only once a trial proved it safe there
    (``procsup._process.trials``). ``by_value``: pickle with cloudpickle
    (``procsup._process.reduction``), not by reference."""

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        name: str = "",
        preload: Sequence[str] = (),
        token: CancellationToken | None = None,
        grace: float = 5.0,
        fresh: bool = False,
        stderr: int = -1,
        by_value: bool = False,
        held: Sequence[int] = (),
        module: str | None = None,
    ) -> None:
        super().__init__(target, args, name)
        self._preload = tuple(preload)
        self._module = module
        self.by_value = by_value  # read by the caller to explain a failure
        self._token = token  # the zygote cancels it if the supervisor dies (then SIGTERM, SIGKILL)
        self._grace = grace
        self._fresh = fresh  # spawn: the zygote's child execs a fresh interpreter
        # An fd among those ``args`` pickle: the child makes it its fd 2 before it imports or
        # unpickles anything, so a failure there reaches the task's stderr tail too.
        self._stderr = stderr
        # Fds among those ``args`` pickle that the zygote keeps open until it reaps the task.
        self._held = tuple(held)

    def start(self) -> None:
        buffer = io.BytesIO()
        pickler = value_pickler() if self.by_value else multiprocessing.reduction.ForkingPickler
        multiprocessing.context.set_spawning_popen(self)  # type: ignore[arg-type]
        try:
            try:
                pickler(buffer, pickle.HIGHEST_PROTOCOL).dump((self._target, self._args))
            except Exception as exc:  # any __reduce__ may raise anything: none of it is ours
                raise UnpicklableError(f"{type(exc).__name__}: {exc}") from exc
            ward = None
            if self._token is not None:
                ward = Ward(self._grace, *borrow_args(self._token, self))
        finally:
            multiprocessing.context.set_spawning_popen(None)
        payload = buffer.getbuffer()
        stderr = FdRef(self._fds.index(self._stderr)) if self._stderr in self._fds else None
        held = tuple(FdRef(self._fds.index(fd)) for fd in self._held if fd in self._fds)
        if self._fresh:
            # What multiprocessing's spawn sends its child, plus the interpreter (with this one's
            # -O, -X, -W flags, as multiprocessing passes them) and environment to exec: the
            # zygote's own are those of this process when it started the zygote.
            preparation = multiprocessing.spawn.get_preparation_data(self.name)
            preparation["authkey"] = bytes(preparation["authkey"])  # refuses to pickle otherwise
            main = preparation.get("init_main_from_path")
            if main is not None and not os.path.isfile(main):
                # ``python - < script.py`` names its main "<stdin>": the child could not run it
                # as ``__mp_main__`` and would die preparing. What it defines comes by value.
                del preparation["init_main_from_path"]
            flags = multiprocessing.util._args_from_interpreter_flags()  # type: ignore[attr-defined]
            fresh = FreshStart(
                [multiprocessing.spawn.get_executable(), *flags],
                dict(os.environ),
                preparation,
                bytes(payload),
            )
            payload = memoryview(pickle.dumps(fresh, pickle.HIGHEST_PROTOCOL))
        zygote = _Zygote.get()
        zygote.sync()
        with _STARTING:  # a fork task started meanwhile would keep a copy of our write end
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            try:
                self.pid = zygote.spawn(
                    self._preload,
                    payload,
                    [write_end, *self._fds],
                    ward,
                    self._fresh,
                    stderr,
                    held,
                    self._module,
                )
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
                self._fds.clear()
        self.sentinel = read_end


def guard(proc: ForkProcess, token: CancellationToken, grace: float) -> None:
    """Make the zygote the guardian of a fork task: if this process dies, it cancels ``token``,
    waits ``grace`` seconds, then SIGTERMs the task's tree, and a second later kills the task's
    shim with everything it holds (``procsup._process.guardian``)."""
    if proc.shim is None:  # SIGCHLD is ignored here and the kernel reaped it: all is over
        return
    collector = _LeanProcess(guard, ())
    multiprocessing.context.set_spawning_popen(collector)  # type: ignore[arg-type]
    try:
        ward = Ward(grace, *borrow_args(token, collector))
    finally:
        multiprocessing.context.set_spawning_popen(None)
    _Zygote.get().send(Guard(proc.shim.pid, ward), [proc.shim.fd, *collector._fds])


class _Zygote:
    """The supervisor side of the one zygote of this process (started on first use)."""

    _instance: _Zygote | None = None
    _instance_lock = threading.Lock()
    own_group = False  # lead a process group of its own (``lead_own_process_group()``)

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._pid = os.getpid()
        self._sock = mine
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RECORDER + "import procsup._process.server as z; z.serve(hooks, early)",
                str(theirs.fileno()),
            ],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            process_group=0 if self.own_group else None,
        )
        theirs.close()
        self._synced: tuple[list[str], list[str], str, dict[bytes, bytes]] | None = None
        self.sync()

    def sync(self) -> None:
        """Give the zygote this process's ``sys.path``, ``sys.argv``, working directory and
        environment if they changed since it last got them (``messages.Sync``): a task module
        importable only through a later entry is found, and a task sees the argv, directory and
        environment of its start."""
        try:
            cwd = os.getcwd()
        except OSError:  # it was removed: the zygote keeps the one it has
            cwd = self._synced[2] if self._synced is not None else "/"
        # os.environ's own mapping of bytes: compared in ~0.5 us, where a copy of os.environ
        # takes ~40 us. Only it holds what putenv() was given: os.environ's changes are there.
        env: dict[bytes, bytes] = vars(os.environ)["_data"]
        synced = self._synced
        if (
            synced is None
            or sys.path != synced[0]
            or sys.argv != synced[1]
            or cwd != synced[2]
            or env != synced[3]
        ):
            path, argv, copy = list(sys.path), list(sys.argv), dict(env)
            changed = None if synced is not None and env == synced[3] else copy
            self._call(Sync(path, argv, cwd, changed), [])  # answered in order
            self._synced = (path, argv, cwd, copy)

    def preload(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """Have the zygote import ``names`` now; return each that failed, with its error."""
        reply = self._call(Preload(tuple(names)), [])
        if not isinstance(reply, Preloaded):
            raise _unexpected(reply)
        return list(reply.failed)

    @classmethod
    def get(cls) -> _Zygote:
        with cls._instance_lock:
            zygote = cls._instance
            if zygote is None or zygote._pid != os.getpid() or zygote._process.poll() is not None:
                if zygote is not None and zygote._pid == os.getpid():
                    zygote.close()
                zygote = cls._instance = cls()
            return zygote

    def spawn(
        self,
        preload: Sequence[str],
        payload: memoryview,
        fds: list[int],
        ward: Ward | None,
        fresh: bool,
        stderr: FdRef | None,
        held: tuple[FdRef, ...] = (),
        module: str | None = None,
    ) -> int:
        """Have the zygote start a task (``fds``: the status pipe's write end, then the task
        fds); return its pid."""
        big = len(payload) > _INLINE  # it travels in one more fd, a memfd
        if len(fds) + big > MAX_FDS:
            raise ValueError(
                f"a task can be given at most {MAX_FDS} file descriptors, procsup's own pipes "
                f"included; this one needs {len(fds) + big}"
            )
        memfd = -1
        try:
            if big:
                memfd = os.memfd_create("procsup-task", os.MFD_CLOEXEC)
                write_all(memfd, payload)
                fds = [*fds, memfd]
            request = Spawn(
                tuple(preload), None if big else bytes(payload), ward, fresh, stderr, held, module
            )
            reply = self._call(request, fds)
        finally:
            if memfd >= 0:
                os.close(memfd)
        match reply:
            case Started(pid=pid):
                return pid
            case StartFailed(error=error):
                raise RuntimeError(f"procsup zygote could not start the task: {error}")
        raise _unexpected(reply)

    def send(self, request: Request, fds: list[int]) -> None:
        """Send a request that has no reply (the zygote handles requests in order)."""
        data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        with self._lock:
            send_fds(self._sock, data, fds)

    def _call(self, request: Request, fds: list[int]) -> Reply:
        data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        with self._lock:
            send_fds(self._sock, data, fds)
            reply = self._sock.recv(1 << 16)  # no reply carries fds
        if not reply:
            raise RuntimeError("procsup zygote exited unexpectedly")
        return decode_reply(reply)

    def close(self) -> None:
        self._sock.close()  # the zygote exits on EOF
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(5)

    def fds(self) -> list[int]:
        return [self._sock.fileno()] if self._pid == os.getpid() else []


def _unexpected(reply: Reply) -> RuntimeError:
    return RuntimeError(f"procsup zygote replied out of turn: {reply!r}")


def import_modules(names: Sequence[str]) -> list[tuple[str, str]]:
    """Import what is not imported yet; return each module that failed, with its error
    (``"ImportError: ..."``).

    A module that raises (any BaseException: SystemExit, KeyboardInterrupt, ...) stays unimported
    and is tried again next time: a supervisor reports it at its first start, a task that needs
    it fails where it imports it.
    """
    failed = []
    for name in names:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except BaseException as exc:  # noqa: BLE001 - returned, for the caller
                failed.append((name, f"{type(exc).__name__}: {exc}"))
    return failed


def preload(names: Sequence[str]) -> list[tuple[str, str]]:
    """Import ``names`` in this process's zygote (starting it if needed); return each that failed
    to import, with its error (``"ImportError: ..."``)."""
    zygote = _Zygote.get()
    zygote.sync()
    return zygote.preload(names)


def lead_own_process_group() -> None:
    """Start this process's zygote (when it starts) in a process group of its own.

    For a host process whose own process group is killed when it exits (a Ray worker: Ray kills a
    dead worker's group): the zygote must outlive its host to stop the host's tasks on their
    ladder (``procsup._process.guardian``). A zygote already running keeps its group.
    """
    _Zygote.own_group = True


def shutdown() -> None:
    """Close this process's zygote, if it has one: the zygote exits (its guardian first stops any
    task still running, on its ladder). For a process that outlives its last task on purpose and
    must leave nothing behind, e.g. a Ray agent let go by its driver (``procsup._ray.agent``)."""
    with _Zygote._instance_lock:
        zygote, _Zygote._instance = _Zygote._instance, None
    if zygote is not None and zygote._pid == os.getpid():
        zygote.close()


def daemon_fds() -> list[int]:
    """The fds this process keeps open to its zygote (for leak checks)."""
    zygote = _Zygote._instance
    return zygote.fds() if zygote is not None else []


def zygote_pids() -> list[int]:
    """The pids of this process's zygote and of its idle spare, if any (for leak checks).

    Read at call time: the spare becomes a task at the next start and is replaced. The spare is
    the zygote's child still in the zygote's process group: every task leaves that group first
    thing (``procsup._process.entry.main``), and its orphans are in the task's group, or their own.
    (A ``spawn`` task looks like a spare too until its fresh interpreter gets that far.)
    """
    zygote = _Zygote._instance
    if zygote is None or zygote._pid != os.getpid() or zygote._process.returncode is not None:
        return []
    pid = zygote._process.pid
    pids = [pid]
    try:
        group = os.getpgid(pid)
        children = psutil.Process(pid).children()
    except (OSError, psutil.Error):  # it exited just now
        return pids
    for child in children:
        with contextlib.suppress(OSError):  # exited meanwhile
            if os.getpgid(child.pid) == group:
                pids.append(child.pid)
    return pids


def _after_fork_in_child() -> None:
    # A forked child must not talk over its parent's zygote socket; it starts its own if needed.
    # Nor keep it open: the zygote must see EOF when the parent dies, whoever outlives it.
    zygote = _Zygote._instance
    if zygote is not None:
        with contextlib.suppress(OSError):
            zygote._sock.close()


def _new_locks() -> None:
    # Nor inherit a held lock: a fork task's shim is forked under _STARTING, and may start tasks.
    global _STARTING
    _STARTING = threading.Lock()
    _Zygote._instance_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
os.register_at_fork(after_in_child=thread_repair(_new_locks))
