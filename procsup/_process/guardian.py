"""The zygote as guardian: nothing a task leaves behind, and no task, outlives its supervisor.

::

    supervisor process                     zygote (PR_SET_CHILD_SUBREAPER, single-threaded)
    ──────────────────                     ───────────────────────────────────────────────
    Spawn(payload, Ward: token*, grace) ─▶ the spare (or a fork) becomes the task
                                             (PR_SET_PDEATHSIG=SIGKILL: it dies with us;
                                              spawn start method: a fork that execs python)
    Guard(shim pidfd, Ward) ─────────────▶ a fork task: watch its shim's pidfd
    status pipe ◀── raw status + rusage ─── SIGCHLD ▶ wait4 ▶ reap(), then close the task's held
                                             write ends (result, stderr, logs: Spawn.held)
                                           a dead task's descendants reparent here: every child
                                             that is neither a task nor the spare is an orphan,
                                             SIGKILLed (tree and all) once its task's grace period
                                             has passed; a spare that dies is reaped silently,
                                             a trial too (its status kept for the zygote, what
                                             it left behind killed at once)
                                           (a fork task's orphans go to its shim, which runs
                                             this same Guardian for it: ``procsup._process.shim``)
    ✝ (SIGKILL, exit, crash) ── EOF ─────▶ SIGKILL the spare, then every ward on the one ladder
                                           (``procsup._os.tree.Ladder``), reaping meanwhile:
                                             cancel its token ("supervisor died") ─▶ grace
                                             ─▶ SIGTERM its tree ─▶ KILL_AFTER ─▶ freeze and
                                             SIGKILL the trees ─▶ KILL_WAIT ─▶ log survivors;
                                           then kill every orphan and doomed child left, in
                                           rounds until none is left, reap, exit

    token*: borrowed (``procsup._token.token.borrow_args``): the guardian holds no reference, so a
            token freed meanwhile reads as cancelled and nothing is released twice.

Things that don't work
----------------------
- ``PR_SET_PDEATHSIG`` in fork tasks instead: the signal follows the *thread* that forked the
  task, so any short-lived thread of the user that starts a task would kill it on exit; and a
  signal gives no grace period, where a token cancellation does.
- A watchdog thread in every task (polling ``getppid()``): a thread per task, and a poll.
- Going from the grace period straight to SIGKILL: a task that missed its cancellation (stuck in
  a C call, say) never gets to run its SIGTERM handler and clean up, as it would under
  ``stop()``. A dead supervisor's tasks are stopped as ``stop()`` stops them.
- Forgetting a doomed orphan once it is killed: if it forked as it died, its child comes to us
  after kill_due() and was never doomed (a process that forks and exits every few ms lived on,
  even past the supervisor). A killed child stays in ``known`` until reaped, so its orphans are
  due at once, and a dying guardian kills every child it has left.
- Letting init adopt a dead task's orphans: nobody would ever kill them. The zygote is a
  subreaper, so they come to it; a fork task's go to its shim, a subreaper too.
- Spawning with multiprocessing (the user's process the parent): the same gap as fork. The zygote
  forks spawn tasks too, and the child execs a fresh interpreter prepared as multiprocessing's
  spawn would (``procsup._process.spawned``).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import signal
import struct
import time
from collections.abc import Sequence
from typing import Any

import psutil

from procsup._os import tree as _contain
from procsup._os.fds import drain, wait_readable
from procsup._os.timeouts import capped
from procsup._os.tree import ExitInfo, Ladder

__all__ = ["STATUS", "Guardian", "children", "decode_status", "encode_status"]

# Raw wait status, peak RSS (bytes), CPU seconds: what a zygote task's status pipe carries.
STATUS = struct.Struct("iqd")
_REAP_AFTER_KILL = 5.0  # seconds the guardian waits for SIGKILLed processes before it exits
_ROUND = 0.1  # seconds between two rounds of orphan killing: new orphans send no SIGCHLD


def encode_status(status: int, usage: Any) -> bytes:
    """What a status pipe carries for a child ``wait4`` returned (``usage``: its rusage)."""
    # ru_maxrss is in KiB on Linux.
    return STATUS.pack(status, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def decode_status(data: bytes) -> ExitInfo:
    """The ``ExitInfo`` a status pipe carried."""
    status, rss, cpu = STATUS.unpack(data)
    core = os.WIFSIGNALED(status) and os.WCOREDUMP(status)
    return ExitInfo(os.waitstatus_to_exitcode(status), core, rss if rss >= 0 else None, cpu)


class _Ward:
    """One task the guardian answers for. ``token`` is borrowed (None in a shim); ``fd`` is the
    status pipe's write end (zygote tasks) or the pidfd of a fork task's shim; ``held``: our
    copies of the write ends of a zygote task's pipes to the supervisor, closed once its status
    is written (``messages.Spawn``)."""

    __slots__ = ("fd", "grace", "held", "pid", "token")

    def __init__(
        self, pid: int, fd: int, token: Any, grace: float, held: Sequence[int] = ()
    ) -> None:
        self.pid = pid
        self.fd = fd
        self.token = token
        self.grace = grace
        self.held = held


class _Rung:
    """A ward on the ladder of a dead supervisor (``procsup._os.tree.Rung``).

    A zygote task is our child: its pid is its own until ``Guardian.reap`` reaps it. A fork
    task's shim is not (the dead supervisor was its parent): its pid is only trusted while its
    pidfd says it has not exited, and read before that check.
    """

    __slots__ = ("guardian", "reason", "ward")

    def __init__(self, guardian: Guardian, ward: _Ward, reason: str) -> None:
        self.guardian = guardian
        self.ward = ward
        self.reason = reason

    def cancel(self) -> None:
        if self.ward.token is not None:
            with contextlib.suppress(Exception):  # a corrupt arena must not save the task
                self.ward.token.cancel(self.reason)

    def exited(self) -> bool:
        ward, guardian = self.ward, self.guardian
        if guardian.children.get(ward.pid) is ward:
            return False
        return guardian.watched.get(ward.fd) is not ward or _exited(ward.fd)

    def _root(self) -> psutil.Process | None:
        """The ward's root process while it has not exited (psutil checks its start time on
        every later call, so a pid reused since is never signalled)."""
        if self.exited():
            return None
        try:
            root = psutil.Process(self.ward.pid)
        except psutil.Error:
            return None
        return None if self.exited() else root

    def terminate(self) -> None:
        root = self._root()
        if root is None:
            return
        # The task leads a process group and is a subreaper: its tree is below it. A shim
        # blocks SIGTERM; its children (the task, and orphans of the task) do not.
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)

    def roots(self) -> list[psutil.Process]:
        root = self._root()
        return [] if root is None else [root]

    def stuck(self) -> list[str]:
        return [] if self.exited() else _contain.stuck([self.ward.pid])


class Guardian:
    """Zygote-side state: the wards (tasks), and orphans waiting for their grace period to end.

    Invariants: ``children`` maps each live zygote task's pid to its ward, ``watched`` each watched
    fork task's pidfd to its ward; ``spares`` holds the pids of unreaped spares (children forked
    ahead of a request, ``procsup._process.server``), never a task's;
    ``trials`` maps the pid of each trial (``procsup._process.trials``) to None until it is reaped,
    then to its raw wait status, until the zygote reads it; ``doomed`` is a heap of
    ``(deadline, pid, process)``, each an orphan (our child), to kill at ``deadline`` if still
    running; ``known`` maps the pids in ``doomed``, and our
    killed children until reap() sees them exit, to their deadline. A fork task's shim
    (``procsup._process.shim``) runs one too, with its task as the only child ward.
    """

    def __init__(self) -> None:
        self.children: dict[int, _Ward] = {}
        self.watched: dict[int, _Ward] = {}
        self.doomed: list[tuple[float, int, psutil.Process]] = []
        self.known: dict[int, float] = {}
        self.spares: set[int] = set()
        self.trials: dict[int, int | None] = {}
        self.supervisor = os.getppid()

    def fds(self) -> list[int]:
        """Every fd the guardian holds (a forked task closes them)."""
        held = [fd for w in self.children.values() for fd in w.held]
        return [*held, *(w.fd for w in [*self.children.values(), *self.watched.values()])]

    def add_child(
        self, pid: int, status_w: int, token: Any, grace: float, held: Sequence[int] = ()
    ) -> None:
        self.children[pid] = _Ward(pid, status_w, token, grace, held)

    def watch(self, pid: int, pidfd: int, token: Any, grace: float) -> None:
        """Answer for the fork task whose shim is ``pid``: its task's orphans are the shim's."""
        self.watched[pidfd] = _Ward(pid, pidfd, token, grace)

    def timeout(self) -> float | None:
        """Seconds until the next orphan is due (at most ``WAIT_CAP``: see ``capped``), or None."""
        return capped(max(0.0, self.doomed[0][0] - time.monotonic())) if self.doomed else None

    def reap(self) -> int:
        """Reap every exited child: report tasks on their status pipe, doom new orphans.

        Returns how many tasks were reported."""
        deadlines = []
        reported = 0
        now = time.monotonic()
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.spares:  # a spare that died before it became a task: no one to tell
                self.spares.discard(pid)
                continue
            if pid in self.trials:  # its verdict is the zygote's to read; what it left, dies now
                self.trials[pid] = status
                deadlines.append(now)
                continue
            ward = self.children.pop(pid, None)
            if ward is None:
                # A doomed orphan exited: its own orphans come to us, on the same deadline.
                deadline = self.known.pop(pid, None)
                if deadline is not None:
                    deadlines.append(deadline)
                continue
            # The raw status and rusage as they are (the supervisor decodes them): the write
            # is on the path from a crash to the parent token's cancellation.
            with contextlib.suppress(OSError):  # EPIPE: the supervisor is gone
                os.write(ward.fd, encode_status(status, usage))
            os.close(ward.fd)
            for fd in ward.held:  # after the status: the thread it wakes sees no EOF first
                os.close(fd)
            deadlines.append(now + ward.grace)
            reported += 1
        if deadlines:
            self._doom(self._orphans(), max(deadlines))
        return reported

    def watched_exited(self, pidfd: int) -> None:
        """A fork task's shim exited: the task and all it left behind are gone."""
        os.close(self.watched.pop(pidfd).fd)

    def kill_due(self) -> None:
        """SIGKILL (trees and all) every doomed process whose deadline has passed."""
        now = time.monotonic()
        due = []
        while self.doomed and self.doomed[0][0] <= now:
            _, pid, proc = heapq.heappop(self.doomed)
            if pid in self.known:
                # Until reap() sees it die, its orphans (it may fork as it dies) are due at once.
                self.known[pid] = now
            due.append(proc)
        _contain.kill_trees(due)

    def _orphans(self) -> list[psutil.Process]:
        orphans = []
        for pid in children():
            if (
                pid not in self.children
                and pid not in self.known
                and pid not in self.spares
                and pid not in self.trials
            ):
                with contextlib.suppress(psutil.Error):
                    orphans.append(psutil.Process(pid))
        return orphans

    def _doom(self, procs: list[psutil.Process], deadline: float) -> None:
        """Kill ``procs`` (our children, orphans: reap() sees them exit) at ``deadline``."""
        for proc in procs:
            if proc.pid not in self.known:
                self.known[proc.pid] = deadline
                heapq.heappush(self.doomed, (deadline, proc.pid, proc))

    def supervisor_gone(self, wait_fd: int) -> None:
        """The supervisor's socket hit EOF: stop every ward as ``stop()`` would (the ladder),
        then kill what is left, reap. Then return.

        ``wait_fd`` becomes readable on SIGCHLD (the zygote's wake-up pipe). Blocks for up to
        the grace period, ``KILL_AFTER`` and ``KILL_WAIT`` (``procsup._os.tree``), then up to
        ``_REAP_AFTER_KILL`` seconds: the zygote has nothing else to do.
        """
        wards = [*self.children.values(), *self.watched.values()]
        if wards:
            # One ladder, so one freeze (a /proc scan a round) kills every ward's tree at once:
            # a process forking in one tree cannot outrun the kill while the others are handled.
            grace = max(w.grace for w in wards)
            reason = (
                f"procsup: the supervisor process (pid {self.supervisor}) died; "
                f"the task is killed after its {grace:g} s grace period"
            )
            ladder = Ladder([_Rung(self, ward, reason) for ward in wards], grace)
            due = ladder.step()
            while due is not None:
                self._wait(wait_fd, due)
                due = ladder.step()
        # What the ladder did not reach: orphans of tasks that exited, and (a ward stuck in the
        # kernel) the wards themselves.
        victims = self._roots()
        end = time.monotonic() + _REAP_AFTER_KILL
        while True:  # until no child is left: killed ones may leave orphans as they die
            victims += [entry[2] for entry in self.doomed] + self._orphans()
            self.doomed.clear()
            _contain.kill_trees(victims)
            for ward in self.watched.values():
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(ward.fd, signal.SIGKILL)
            victims = []
            self._settle()
            left = end - time.monotonic()
            if not children() or left <= 0:
                break
            if wait_readable([wait_fd], min(_ROUND, left)):
                drain(wait_fd)

    def _roots(self) -> list[psutil.Process]:
        """Every ward still running: our children, and the shims whose pidfd says so."""
        roots = []
        for pid in self.children:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(pid))
        for ward in self.watched.values():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(ward.pid)
                if not _exited(ward.fd):
                    roots.append(proc)
        return roots

    def _settle(self) -> None:
        """Reap what has exited; forget the shims whose pidfd says they have."""
        self.reap()
        for fd in [fd for fd in self.watched if _exited(fd)]:
            self.watched_exited(fd)

    def _wait(self, wait_fd: int, deadline: float) -> None:
        """Reap (and watch pidfds) until a ward exits or ``deadline`` passes."""
        wards = len(self.children) + len(self.watched)
        while True:
            self._settle()
            left = deadline - time.monotonic()
            if left <= 0 or len(self.children) + len(self.watched) < wards:
                return
            if wait_fd in wait_readable([wait_fd, *self.watched], left):
                drain(wait_fd)


def children() -> list[int]:
    """The pids of this process's children (zombies included)."""
    me = os.getpid()
    try:
        # os-level, not open(): the zygote reads this after every task's exit, and a text file
        # object wrote ~20 more pages it shares with its tasks (each copied first).
        fd = os.open(f"/proc/{me}/task/{me}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no CONFIG_PROC_CHILDREN: the slower scan
        return [p.pid for p in psutil.Process().children()]
    try:
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    finally:
        os.close(fd)
    return [int(p) for p in data.split()]


def _exited(pidfd: int) -> bool:
    return bool(wait_readable([pidfd], 0))
