"""The zygote process itself: a preloaded, single-threaded server that starts tasks on request.

Its supervisor-side counterpart and the protocol are in ``procsup._process.zygote``; what it does
for tasks whose supervisor died is in ``procsup._process.guardian``. Started as ``python -c
"<RECORDER> import procsup._process.server as z; z.serve(hooks, early)" FD``: the recorder
(``procsup._os.forking``) lets it fork without CPython's fork handling, which a child of a
one-thread process does not need.

::

    zygote                                          spare (forked ahead, idle in recvmsg)
    ──────                                          ─────────────────────────────────────
    after a start, once a task exits (or 5 ms on),
    unless a request waits:
      sched_yield, fork a spare (Hooks.fork) ─────▶ PR_SET_PDEATHSIG (getppid() checked),
      idle: rehearse a request and a task's         close the zygote's fds, reset SIGCHLD
      death (the zygote's copies of those pages,    and the wake-up fd; idle: rehearse a
      made now)                                     request, its payload and entry.warm(),
                                                    what every task does first (each step
                                                    skipped once a request is there)
    Spawn + fds, and the spare has not exited:
      reply Started(spare pid) to the supervisor
      forward the datagram + the task's fds ──────▶ unpickle the same Spawn; import the task's
      over the spare's socketpair                   module if it is new, close an arena fd it
      then import procsup's needs, borrow its       maps already, load_payload, target(*args),
      token, add_child(spare pid), close our fds    _exit
    no spare (none yet, or it died idle): fork the task at once, as before
    the task's module new here: queue a trial ────▶ trial (after the spare's fork): import it
      (``procsup._process.trials``); once one       timed, _exit 0 if clean and fast; reaped
      exits 0, import it, idle, and fork a fresh    silently. Any other end: the zygote never
      spare                                         imports it, its tasks do
    Spawn(fresh=True), the spawn start method: fork a child that execs python, prepared as
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
- Typed messages straight after a fork: the first write to each page after ``fork()`` copies it,
  and unpickling a Spawn and pickling the Started reply write to many (refcounts of classes and
  functions, interned names): measured in a fresh fork at 182 us, against 93 for the tuples
  they replaced and 26 once rehearsed. So the zygote and the spare each rehearse once after the
  spare's fork (``_rehearse``), while idle: the zygote's start round trip went from 259 us
  (tuples) to 218 (median of 300, an idle zygote, this 2-core machine), not to 350 unrehearsed.
- Relying on a spare's arena mappings: it was forked before the request, so a token's arena the
  zygote adopted since then is not mapped in it; it adopts that fd itself, and closes the fd only
  for an arena it already maps (``_arrive_and_run``).
- A pool of spares, forked back to back so that the zygote copies the pages it writes once per
  batch instead of once per fork: with 8 tasks in flight it cost more CPU per task (zygote 1450
  against 1300 us, tasks 2325 against 2100, medians of 8 batches of 200), since every start then
  pays a spare's extra hop (its socketpair, the forward, its idle rehearsal), where under load a
  start that finds no spare is forked on demand, the cheapest way. One spare is for latency.
- Forking the spare, or rehearsing after its fork, while a request waits: the request waits a
  millisecond for the fork, and ~0.5 ms more for the rehearsals (whose page copies it makes
  itself if it comes first). When starts come back to back, the caller waits for every reply.
- Forking the spare a millisecond after a task's exit, so that the supervision thread its report
  wakes, and whoever that thread wakes, have the CPUs first: with crashes back to back the fork
  then met the next crash's report (crash detection 0.70-0.79 against 0.63-0.68 ms, three runs
  of 60 each). Nor rehearsing a millisecond later: no difference (0.731 against 0.730 ms,
  medians of 300).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: see _become_child()
import contextlib
import multiprocessing.connection
import os
import pickle
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Collection, Sequence
from multiprocessing.connection import Connection
from typing import Any, NoReturn, cast

from procsup._os import proc as _platform
from procsup._os.fds import drain, recv_fds, send_fds, wait_readable
from procsup._os.forking import Hook, Hooks
from procsup._process.entry import main, prepare_zygote, warm
from procsup._process.guardian import Guardian, encode_status
from procsup._process.messages import (
    FdRef,
    Guard,
    Passed,
    Preload,
    Preloaded,
    Spawn,
    StartFailed,
    Sync,
    Synced,
    Ward,
    encode_started,
    load_payload,
)
from procsup._process.setup import ChildSetup, Prepared
from procsup._process.spawned import exec_fresh
from procsup._process.trials import Trials, trial_main
from procsup._process.zygote import import_modules, run_target
from procsup._token.arena import Arena
from procsup._token.token import CancellationToken, borrowed

__all__ = ["serve"]

# After a start, the next spare is forked once a task exits or this many seconds have passed:
# forking takes the zygote ~1 ms, which must not delay the report of a task that dies at once.
_SPARE_DELAY = 0.005


_HELD = {signal.SIGTERM, signal.SIGHUP}  # blocked in the zygote, unblocked in its children
# A child's rusage as wait4 returns one, for ``rehearse_reap``.
_REHEARSAL_USAGE = resource.struct_rusage((0.0, 0.0) + (0,) * 14)
# A Spawn as a supervisor sends one, for ``_rehearse``.
_REHEARSAL = pickle.dumps(
    Spawn(("",), b"", Ward(0.0, b"", FdRef(0), 0, 0), False, FdRef(0), (FdRef(1), FdRef(2))),
    pickle.HIGHEST_PROTOCOL,
)


def serve(hooks: Sequence[Hook] = (), early: Collection[str] = ("?",)) -> None:
    """Zygote main loop: start a task per request, report each task's exit on its status pipe,
    and guard every task (``procsup._process.guardian``) until the supervisor's socket closes.

    ``hooks``, ``early``: what ``procsup._os.forking.RECORDER`` kept, for ``Hooks``; without
    them every fork is ``os.fork()``.
    """
    _platform.set_child_subreaper()  # a dead task's descendants come to us, not to init
    server = _Server(socket.socket(fileno=int(sys.argv[1])), Hooks(hooks, early))
    signal.set_wakeup_fd(server.wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the supervisor to handle
    # A SIGTERM or SIGHUP sent to the supervisor's process group must not end the guardian: it
    # learns of the supervisor's death from its socket, then stops every task as stop() would.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    prepare_zygote()
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

    def __init__(self, sock: socket.socket, hooks: Hooks) -> None:
        self.sock = sock
        self.hooks = hooks  # forks without CPython's fork handling where none is needed
        self.guardian = Guardian()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.spare: _Spare | None = None
        self.spare_due: float | None = None  # when to fork the next spare, if no task exits first
        self.trials = Trials(self.guardian)  # which task modules we may import ourselves

    def own(self) -> list[int]:
        """The zygote's fds that no child may keep (the guardian's are in ``guardian.fds()``)."""
        fds = [self.sock.fileno(), self.wake_r, self.wake_w, self.selector.fileno()]
        return fds if self.spare is None else [*fds, self.spare.sock.fileno()]

    def run(self) -> None:
        guardian = self.guardian
        while True:
            spare = None if self.spare_due is None else max(0.0, self.spare_due - time.monotonic())
            due = [
                left
                for left in (guardian.timeout(), spare, self.trials.timeout())
                if left is not None
            ]
            ready = self.selector.select(min(due, default=None))
            # A task's death first: its status is on the path from a crash to the parent token's
            # cancellation, and a request or the wake-up pipe's drain can wait a few microseconds.
            reported = guardian.reap()
            for key, _ in ready:
                if key.fileobj is self.sock:
                    pidfd = self.serve_request()
                    if pidfd is None:
                        self.selector.unregister(self.sock)
                        self.drop_spare(kill=True)
                        self.trials.stop()
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
            reported += guardian.reap()  # what exited meanwhile (the drained wake-ups')
            if self.spare is not None and self.spare.pid not in guardian.spares:
                self.drop_spare(kill=False)  # it died idle (reaped): replaced after the next start
            guardian.kill_due()
            self.trials.check()
            if self.trials.passed and not self.request_waits():
                self.import_passed()  # before a spare is forked: it then has them
            if self.spare_due is not None and (reported or time.monotonic() >= self.spare_due):
                self.fork_spare()
            # Off a start's path as the spare is (see the header), and after it.
            if self.trials.queued and self.spare_due is None and not self.request_waits():
                self.fork_trial()

    def serve_request(self) -> int | None:
        """Handle one request: None at EOF, a pidfd to watch, or -1."""
        data, fds = recv_fds(self.sock)
        if not data:
            return None
        request = pickle.loads(data)
        match request:
            case Spawn():  # fds: the status pipe's write end, then the task fds
                self.spawn(data, request, fds[0], fds[1:])
            case Guard(shim=pid, ward=ward):  # fds: the shim's pidfd, then the token's arena
                token, redundant = _borrow(ward, fds[1:])
                if redundant >= 0:
                    os.close(redundant)
                self.guardian.watch(pid, fds[0], token, ward.grace)
                return fds[0]
            case Sync(path=path, argv=argv, cwd=cwd, env=env):
                sys.path[:] = path
                sys.argv[:] = argv
                if env is not None:  # putenv and unsetenv too: a forked task's C library sees it
                    for name in [name for name in os.environb if name not in env]:
                        del os.environb[name]
                    os.environb.update(env)
                with contextlib.suppress(OSError):  # not ours to enter: the task will find out
                    os.chdir(cwd)
                self.drop_spare(kill=False)  # it has the old ones; the next start forks afresh
                self.trials.synced()  # a module's top level may read any of them
                self.reply(Synced())
            case Preload(names=names):
                # Supervisor's first start: its preload list, imported here now, failures named.
                known = len(sys.modules)
                self.reply(Preloaded(tuple(import_modules(names))))
                self.renew_spare_since(known)
        return -1

    def reply(self, reply: Synced | Preloaded | StartFailed | int) -> None:
        """Answer the supervisor; an int is ``Started(pid)`` (``messages.encode_started``)."""
        data = (
            encode_started(reply)
            if isinstance(reply, int)
            else pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        )
        # EPIPE: the supervisor died awaiting it. The next read is EOF: the guardian's cue.
        with contextlib.suppress(ConnectionError):
            self.sock.send(data)

    def spawn(self, data: bytes, request: Spawn, status_w: int, task_fds: list[int]) -> None:
        """Start ``request``'s task: the spare, which gets ``data`` (the very datagram), or a
        fork. ``task_fds``: those the payload's ``FdRef``s index, then a big payload's memfd."""
        fresh = request.fresh  # the spawn start method, a fork that execs python: no spare
        spare = None if fresh else self.take_spare()
        if not fresh and self.spare is None and self.spare_due is None:
            self.spare_due = time.monotonic() + _SPARE_DELAY
        if spare is not None:
            # Reply, then wake the spare, before any other work: that is the start's critical
            # path (and the spare, once woken, may take our CPU until its task is done).
            self.reply(spare.pid)
            self.forward(spare, data, task_fds)
        # Here too, so that later spares and forked tasks have them ready: procsup's needs and
        # the preload list. The task's own module only once a trial has proven it safe here.
        import_modules(request.preload)
        if request.module is not None:
            self.trials.consider(request.module)
        token, grace = None, 5.0
        if request.ward is not None:
            grace = request.ward.grace
            # The arena fd stays ours if we adopted it; else the child closes its copy.
            token, _ = _borrow(request.ward, task_fds)
        if spare is not None:
            pid = spare.pid
            self.guardian.spares.discard(pid)
        else:
            try:
                pid = self.fork_task(request, status_w, task_fds)
            except OSError as exc:
                os.close(status_w)
                _close_unkept(task_fds)
                self.reply(StartFailed(str(exc)))
                return
            self.reply(pid)
        # The write ends of its pipes to the supervisor stay open here until its status is
        # written: its exit then closes none of them (``messages.Spawn.held``).
        held = [task_fds[ref.index] for ref in request.held]
        self.guardian.add_child(pid, status_w, token, grace, held)  # before the next reap
        _close_unkept(task_fds, held)

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
            send_fds(spare.sock, data, fds)
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
        # A process we just woke (the supervision thread, after a status write) may be queued on
        # our CPU: let it run before a fork keeps the CPU for a millisecond.
        os.sched_yield()
        if self.request_waits():
            return  # a request waits: it comes first (it forks its own task if need be)
        self.spare_due = None
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return
        close = [*self.own(), *self.guardian.fds(), mine.fileno()]
        zygote = os.getpid()
        try:
            pid = self.hooks.fork()
        except OSError:
            mine.close()
            theirs.close()
            return
        if pid == 0:  # pragma: no cover - runs in the spare
            _spare_main(theirs, zygote, close)
        theirs.close()
        self.guardian.spares.add(pid)
        self.spare = _Spare(pid, mine)
        if not self.request_waits():  # else the request first: see the header
            _rehearse()
            self.rehearse_reap()

    def request_waits(self) -> bool:
        """True if the supervisor's next request is already there to be read."""
        return bool(wait_readable([self.sock.fileno()], 0))

    def import_passed(self) -> None:
        """Import the modules whose trial passed; called only while no request waits."""
        known = len(sys.modules)
        for passed in self.trials.take_passed():
            if import_modules([passed]):  # it did not raise in its trial: it may differ here
                self.trials.never.add(passed)
        self.renew_spare_since(known)

    def renew_spare_since(self, known: int) -> None:
        """Modules were imported here since ``sys.modules`` held ``known``: the spare, forked
        without them, would import them itself (and miss the at-fork hooks they register). A
        fresh one is forked instead, now."""
        if len(sys.modules) != known and self.spare is not None:
            self.drop_spare(kill=False)
            self.spare_due = time.monotonic()

    def fork_trial(self) -> None:
        """Fork a trial of the next queued module, unless a trial runs (``trials``)."""
        name = self.trials.next()
        if name is None:
            return
        close = [*self.own(), *self.guardian.fds()]
        zygote = os.getpid()
        try:
            pid = self.hooks.fork()
        except OSError:
            self.trials.requeue(name)  # tried again after the next event
            return
        if pid == 0:  # pragma: no cover - runs in the trial
            try:
                _become_child(zygote, close)
                trial_main(name)
            finally:
                os._exit(1)
        self.trials.started(name, pid)

    def rehearse_reap(self) -> None:
        """Go once, idle, where a task's death takes the zygote, up to the status write: the
        copies of the pages it writes are then made now, off the path from a crash to its
        report (a task's death cost the zygote ~90 page faults after a spare's fork)."""
        self.selector.select(0)
        drain(self.wake_r)
        self.guardian.reap()
        encode_status(0, _REHEARSAL_USAGE)

    def fork_task(self, request: Spawn, status_w: int, task_fds: list[int]) -> int:
        close = [*self.own(), status_w, *self.guardian.fds()]
        zygote = os.getpid()
        pid = self.hooks.fork()
        if pid == 0:  # pragma: no cover - runs in the task process
            code = 1
            try:
                _become_child(zygote, close)
                code = run_target(_become_task, (request, task_fds))
            finally:
                os._exit(code)
        return pid


def _rehearse() -> None:
    """Unpickle a Spawn and encode a reply, as a start will, once after a fork: the first write
    to each page after a fork copies it, and these touch many (the classes' refcounts, their
    functions, interned names). Done here, that cost is off the next start's critical path."""
    pickle.loads(_REHEARSAL)
    encode_started(0)


class _Conn:
    """Pickles as a ``Connection`` on the ``index``-th task fd does in a start's payload."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = multiprocessing.connection.rebuild_connection  # type: ignore[attr-defined]
        return (rebuild, (FdRef(self.index), False, True))


# A payload as ``procsup._supervision.launch`` makes one, but for the task's function and token.
_LOG = cast(Connection, _Conn(0))
_PAYLOAD = pickle.dumps(
    (main, (Prepared(os.getpid, ChildSetup(_LOG, 0, {}, None, None, None)), (), {}, _Conn(1))),
    pickle.HIGHEST_PROTOCOL,
)


def _rehearse_payload() -> None:
    """In a spare, idle: unpickle a payload as its task will (~70 page faults copied here, off
    the start's path, this 2-core VM), on two fds of its own, closed after. If this raises, the
    spare exits, and the next start forks its task on demand."""
    fds = [os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC) for _ in range(2)]
    _, (prepared, _, _, writer) = load_payload(_PAYLOAD, fds)
    # The unpickler's memo is in a reference cycle: these would wait for the collector.
    prepared.setup.log.close()
    writer.close()


def _become_child(zygote: int, close: list[int]) -> None:
    """First steps of any child: die with the zygote, drop what is the zygote's."""
    # Die with the zygote: it is the guardian, and the status pipe would lie otherwise.
    _platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != zygote:
        os._exit(1)
    for fd in close:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    # signal.signal() would return the zygote's handler as an enum, and a callable fails to
    # convert, through a ValueError raised and caught: ~45 pages written (shared, so copied).
    _signal.signal(signal.SIGCHLD, signal.SIG_DFL.value)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the mask survives execve too


def _spare_main(sock: socket.socket, zygote: int, close: list[int]) -> NoReturn:
    """A spare: wait for the one request the zygote forwards, then become that task."""
    code = 1
    try:
        _become_child(zygote, close)

        def idle() -> bool:  # no request yet: the rehearsals are off the start's path
            return not wait_readable([sock.fileno()], 0)

        for rehearsal in (_rehearse, _rehearse_payload):
            if idle():  # the spare's own copies of those pages, before a start needs them
                rehearsal()
        warm(idle)  # and what every task does first (procsup._process.entry)
        data, fds = recv_fds(sock)
        sock.close()
        # No data: dropped (the supervisor is gone, or the spare could not be used).
        code = run_target(_arrive, (data, fds)) if data else 0
    finally:
        os._exit(code)


def _arrive(data: bytes, fds: list[int]) -> None:
    """In a spare: the datagram the zygote received, forwarded, is this task's ``Spawn``."""
    _become_task(pickle.loads(data), fds)


def _become_task(request: Spawn, fds: list[int]) -> None:
    """In a zygote child (the spare, or a fork): run the task ``request`` starts. ``fds``: the
    task fds, then a big payload's memfd."""
    _redirect_stderr(fds, request)
    payload = request.payload if request.payload is not None else _read_memfd(fds.pop())
    if request.fresh:
        exec_fresh(payload, fds)
    # A spare forked before the zygote imported them; the task's own module if it is new to the
    # zygote (``procsup._process.trials``): a crash there is this task's alone.
    own = () if request.module is None else (request.module,)
    import_modules((*request.preload, *own))
    if request.ward is not None:
        _close_redundant_arena(request.ward, fds)
    target, args = load_payload(payload, fds)
    del payload
    target(*args)


def _redirect_stderr(fds: list[int], request: Spawn) -> None:
    """Make the task's stderr pipe this process's fd 2 before anything is imported or
    unpickled: a failure there then reaches the task's crash record."""
    if request.stderr is not None:
        os.dup2(fds[request.stderr.index], 2)


def _close_redundant_arena(ward: Ward, fds: list[int]) -> None:
    """Close the fd the ward's token arena came with if this process maps that arena through
    another fd (a spare forked after the zygote mapped it, a fork of a zygote that had mapped it
    before this start): unpickling adopts only the fd of an arena not mapped yet."""
    arena = Arena._registry.get(ward.key)
    fd = fds[ward.arena.index]
    if arena is not None and arena.fd != fd:
        os.close(fd)


def _read_memfd(fd: int) -> bytes:
    with open(fd, "rb") as f:  # closes the memfd
        f.seek(0)  # the offset is shared with the writer's open file description
        return f.read()


def _borrow(ward: Ward, fds: Sequence[int]) -> tuple[CancellationToken, int]:
    """Borrow a ward's token in the zygote. Returns it and the fd its arena came with, or -1 if
    the zygote adopted that fd as the arena's (then it is the zygote's to keep)."""
    fd = fds[ward.arena.index]
    token = borrowed(ward.key, Passed(fd), ward.slot, ward.live)
    return token, -1 if Arena._registry[ward.key].fd == fd else fd


def _close_unkept(fds: list[int], held: Sequence[int] = ()) -> None:
    """Close our copies of a task's fds, but not one the zygote adopted as an arena's, nor those
    ``held`` (the guardian's to close)."""
    kept = {arena.fd for arena in Arena._registry.values()}.union(held)
    for fd in fds:
        if fd not in kept:
            os.close(fd)
