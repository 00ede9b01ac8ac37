"""The zygote process itself: a preloaded, single-threaded server that starts tasks on request.

Its supervisor-side counterpart and the protocol are in ``procsup._process.zygote``; what it does
for tasks whose supervisor died is in ``procsup._process.guardian``. Started as
``python -c "import procsup._process.server as z; z.serve()" FD``.

::

    zygote                                          spare (forked ahead, idle in recvmsg)
    ──────                                          ─────────────────────────────────────
    after a start, once a task exits (or 5 ms on):
      sched_yield, fork a spare ──────────────────▶ PR_SET_PDEATHSIG (getppid() checked),
                                                    close the zygote's fds, reset SIGCHLD
                                                    and the wake-up fd
    "spawn" + fds, and the spare has not exited:
      reply ("pid", spare pid) to the supervisor
      forward the datagram + the task's fds ──────▶ import the task's module if it is new,
      over the spare's socketpair                   close an arena fd it maps already,
      then import the task's module, borrow its     unpickle, target(*args), _exit
      token, add_child(spare pid), close our fds
    no spare (none yet, or it died idle): fork the task at once, as before
    a spawn request ("spawn", ..., fresh=True): fork a child that execs python, prepared as
      multiprocessing's spawn would (``procsup._process.spawned``); never a spare

A spare takes ``fork()`` (a millisecond of the zygote's time here, plus the child's first page
faults) off the critical path of a start. Until its request comes it is not a task: the guardian
skips it when it looks for orphans and reaps it silently if it dies, and the zygote kills it when
the supervisor goes. A spare that dies idle is replaced after the next start, never in a loop. A
zygote that only guards fork tasks or starts spawn tasks never forks one; otherwise one process
always waits (~2 MiB of unique memory here: it shares the zygote's pages).

A spare that has exited is never handed a request (``waitid(WNOWAIT)`` first). One killed from
outside that is still dying (exiting takes about a millisecond here) or dies during the hand-over is
reported as the task, killed: the signal is its exit status (and if the datagram cannot be sent to
a live spare, the zygote SIGKILLs it).

Things that don't work
----------------------
- Forwarding before replying: the woken spare may take the zygote's CPU and run the whole task
  before the reply goes out (start round trips of 1.7-3 ms measured here instead of ~0.5). And
  any work before both (the imports, borrowing the token) is on the start's path: 0.2 ms more.
- Forking the next spare right after a start: the fork holds the zygote ~1 ms, and a task that
  died meanwhile waited for it (crash detection 1.2 -> 2.0 ms). Nor right after a status write
  without ``sched_yield()``: the supervision thread it woke may be queued behind the fork.
- Relying on a spare's arena mappings: it was forked before the request, so a token's arena the
  zygote adopted since then is not mapped in it; it adopts that fd itself, and closes the fd only
  for an arena it already maps (``_arrive_and_run``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, NoReturn

from procsup._os import proc as _platform
from procsup._process.guardian import Guardian, drain
from procsup._process.spawned import exec_fresh
from procsup._process.zygote import MAX_FDS, import_modules, inherited, run_target
from procsup._token.token import borrowed

__all__ = ["serve"]

_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)
# After a start, the next spare is forked once a task exits or this many seconds have passed:
# forking takes the zygote ~1 ms, which must not delay the report of a task that dies at once.
_SPARE_DELAY = 0.005


_HELD = {signal.SIGTERM, signal.SIGHUP}  # blocked in the zygote, unblocked in its children


def serve() -> None:
    """Zygote main loop: start a task per request, report each task's exit on its status pipe,
    and guard every task (``procsup._process.guardian``) until the supervisor's socket closes."""
    _platform.set_child_subreaper()  # a dead task's descendants come to us, not to init
    server = _Server(socket.socket(fileno=int(sys.argv[1])))
    signal.set_wakeup_fd(server.wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the supervisor to handle
    # A SIGTERM or SIGHUP sent to the supervisor's process group must not end the guardian: it
    # learns of the supervisor's death from its socket, then cancels, waits, kills.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    server.run()


class _Spare:
    """The zygote's end of its one pre-forked child: the pid and the socket it waits on."""

    __slots__ = ("pid", "sock")

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock


class _Server:
    """The zygote's state. Invariant: ``spare`` is None or a live-or-unreaped spare whose pid is
    in ``guardian.spares``; the zygote holds no other fd to it than ``spare.sock``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.guardian = Guardian()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.spare: _Spare | None = None
        self.spare_due: float | None = None  # when to fork the next spare, if no task exits first

    def own(self) -> list[int]:
        """The zygote's fds that no child may keep (the guardian's are in ``guardian.fds()``)."""
        fds = [self.sock.fileno(), self.wake_r, self.wake_w, self.selector.fileno()]
        return fds if self.spare is None else [*fds, self.spare.sock.fileno()]

    def run(self) -> None:
        guardian = self.guardian
        while True:
            timeout = guardian.timeout()
            if self.spare_due is not None:
                left = max(0.0, self.spare_due - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            for key, _ in self.selector.select(timeout):
                if key.fileobj is self.sock:
                    pidfd = self.serve_request()
                    if pidfd is None:
                        self.selector.unregister(self.sock)
                        self.drop_spare(kill=True)
                        guardian.supervisor_gone(self.wake_r)
                        return
                    if pidfd >= 0:
                        self.selector.register(pidfd, selectors.EVENT_READ)
                elif key.fileobj == self.wake_r:
                    drain(self.wake_r)
                else:
                    assert isinstance(key.fileobj, int)
                    self.selector.unregister(key.fileobj)
                    guardian.watched_exited(key.fileobj)
            reported = guardian.reap()
            if self.spare is not None and self.spare.pid not in guardian.spares:
                self.drop_spare(kill=False)  # it died idle (reaped): replaced after the next start
            guardian.kill_due()
            if self.spare_due is not None and (reported or time.monotonic() >= self.spare_due):
                self.fork_spare()

    def serve_request(self) -> int | None:
        """Handle one message: None at EOF, a pidfd to watch, or -1."""
        data, fds = _receive(self.sock)
        if not data:
            return None
        message = pickle.loads(data)
        if message[0] == "path":
            sys.path[:] = message[1]
            self.drop_spare(kill=False)  # it has the old path; the next start forks afresh
            self.sock.send(pickle.dumps(("ok",)))
            return -1
        if message[0] == "preload":
            # Supervisor's first start: its preload list, imported here now, failures named.
            self.sock.send(pickle.dumps(("preloaded", import_modules(message[1]))))
            return -1
        if message[0] == "guard":
            _, pid, grace, args = message  # fds: the fork task's shim's pidfd, the token's
            token, redundant = _borrow(args, fds[1:])
            if redundant >= 0:
                os.close(redundant)
            self.guardian.watch(pid, fds[0], token, grace)
            return fds[0]
        self.spawn(data, message, fds)
        return -1

    def spawn(self, data: bytes, message: tuple[Any, ...], fds: list[int]) -> None:
        _, preload, payload, ward, fresh, stderr = message
        status_w, task_fds = fds[0], fds[1:]  # task_fds: the memfd (a big payload), then ``rest``
        # ``fresh``: the spawn start method, a fork that execs python; it needs no spare.
        spare = None if fresh else self.take_spare()
        if not fresh and self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic() + _SPARE_DELAY
        if spare is not None:
            # Reply, then wake the spare, before any other work: that is the start's critical
            # path (and the spare, once woken, may take our CPU until its task is done).
            self.sock.send(pickle.dumps(("pid", spare.pid)))
            self.forward(spare, data, task_fds)
        import_modules(preload)  # in the zygote too: later spares and forked tasks have it ready
        rest = task_fds if payload is not None else task_fds[1:]  # what DupFd indices count
        token, grace, redundant = None, 5.0, -1
        if ward is not None:
            grace, args = ward
            token, redundant = _borrow(args, rest)
        if spare is not None:
            pid = spare.pid
            self.guardian.spares.discard(pid)
        else:
            if payload is None:
                payload, task_fds = _read_memfd(task_fds[0]), rest
            try:
                pid = self.fork_task(payload, status_w, rest, redundant, fresh, stderr)
            except OSError as exc:
                os.close(status_w)
                _close_unkept(task_fds)
                self.sock.send(pickle.dumps(("error", str(exc))))
                return
            self.sock.send(pickle.dumps(("pid", pid)))
        self.guardian.add_child(pid, status_w, token, grace)  # before the next reap
        _close_unkept(task_fds)

    def take_spare(self) -> _Spare | None:
        """The spare, unless there is none or it has exited (then the guardian reaps it)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        with contextlib.suppress(ChildProcessError):  # never: reaped spares are dropped at once
            if os.waitid(os.P_PID, spare.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return spare
        spare.sock.close()
        return None

    def forward(self, spare: _Spare, data: bytes, fds: list[int]) -> None:
        """Hand a request to the spare, whose pid the supervisor now has as the task's."""
        try:
            spare.sock.sendmsg([data], _rights(fds))
        except OSError:
            # Dead (EPIPE, ECONNREFUSED): its exit status is the task's. Alive (ENOBUFS): the
            # task cannot run, and its status must say so.
            with contextlib.suppress(OSError):
                os.kill(spare.pid, signal.SIGKILL)  # our unreaped child: the pid is its
        finally:
            spare.sock.close()

    def drop_spare(self, *, kill: bool) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.sock.close()  # an idle spare reads EOF and exits
            if kill and spare.pid in self.guardian.spares:
                with contextlib.suppress(OSError):
                    os.kill(spare.pid, signal.SIGKILL)  # our unreaped child: the pid is its

    def fork_spare(self) -> None:
        """Fork the next spare; on failure (EAGAIN, EMFILE) tasks are forked on demand."""
        self.spare_due = None
        # A process we just woke (the supervision thread, after a status write) may be queued on
        # our CPU: let it run before a fork keeps the CPU for a millisecond.
        os.sched_yield()
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return
        close = [*self.own(), *self.guardian.fds(), mine.fileno()]
        zygote = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            return
        if pid == 0:  # pragma: no cover - runs in the spare
            _spare_main(theirs, zygote, close)
        theirs.close()
        self.guardian.spares.add(pid)
        self.spare = _Spare(pid, mine)

    def fork_task(
        self,
        payload: bytes,
        status_w: int,
        rest: list[int],
        redundant: int,
        fresh: bool,
        stderr: int | None,
    ) -> int:
        close = [*self.own(), status_w, *self.guardian.fds()]
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the task process
            code = 1
            try:
                _become_child(zygote, close)
                _redirect_stderr(rest, stderr)
                if fresh:
                    exec_fresh(payload, rest)
                # ``redundant``: the arena arrived again, but this process maps it already.
                if redundant >= 0:
                    os.close(redundant)
                inherited[:] = rest
                code = run_target(_unpickle_and_run, (payload,))
            finally:
                os._exit(code)
        return pid


def _become_child(zygote: int, close: list[int]) -> None:
    """First steps of any child: die with the zygote, drop what is the zygote's."""
    # Die with the zygote: it is the guardian, and the status pipe would lie otherwise.
    _platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != zygote:
        os._exit(1)
    for fd in close:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the mask survives execve too


def _spare_main(sock: socket.socket, zygote: int, close: list[int]) -> NoReturn:
    """A spare: wait for the one request the zygote forwards, then become that task."""
    code = 1
    try:
        _become_child(zygote, close)
        data, fds = _receive(sock)
        sock.close()
        # No data: dropped (the supervisor is gone, or the spare could not be used).
        code = run_target(_arrive_and_run, (data, fds)) if data else 0
    finally:
        os._exit(code)


def _arrive_and_run(data: bytes, fds: list[int]) -> None:
    """In a spare: get the payload and the fds its pickle refers to as a forked task has them."""
    from procsup._token.arena import Arena

    _, preload, payload, ward, _, stderr = pickle.loads(data)
    if payload is None:
        payload, fds = _read_memfd(fds[0]), fds[1:]
    _redirect_stderr(fds, stderr)
    import_modules(preload)
    if ward is not None:
        key, ref = ward[1][:2]
        if key in Arena._registry:  # mapped before our fork: unpickling will not adopt this fd
            os.close(fds[ref.index])
    inherited[:] = fds
    _unpickle_and_run(payload)


def _redirect_stderr(fds: list[int], index: int | None) -> None:
    """Make ``fds[index]``, the task's stderr pipe, this process's fd 2 before anything is
    imported or unpickled: a failure there then reaches the task's crash record."""
    if index is not None:
        os.dup2(fds[index], 2)


def _read_memfd(fd: int) -> bytes:
    with open(fd, "rb") as f:  # closes the memfd
        f.seek(0)  # the offset is shared with the writer's open file description
        return f.read()


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds: list[int] = []
    data, ancdata, _, _ = sock.recvmsg(1 << 17, _ANCILLARY)
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(blob) // 4}i", blob[: len(blob) - len(blob) % 4])
    return data, fds


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def _unpickle_and_run(payload: bytes) -> None:
    target, args = pickle.loads(payload)
    del payload
    target(*args)


def _borrow(args: Any, fds: list[int]) -> tuple[Any, int]:
    """Unpickle a borrowed token in the zygote. Returns it and the fd its arena came with, or -1
    if the zygote adopted that fd as the arena's (then it is the zygote's to keep)."""
    from procsup._token.arena import Arena

    inherited[:] = fds
    try:
        token = borrowed(*args)
    finally:
        inherited.clear()
    dup = fds[args[1].index]
    adopted = any(arena.fd == dup for arena in Arena._registry.values())
    return token, -1 if adopted else dup


def _close_unkept(fds: list[int]) -> None:
    """Close our copies of a task's fds, but not one the zygote adopted as an arena's."""
    from procsup._token.arena import Arena

    kept = {arena.fd for arena in Arena._registry.values()}
    for fd in fds:
        if fd not in kept:
            os.close(fd)
