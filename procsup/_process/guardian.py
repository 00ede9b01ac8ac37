"""The zygote as guardian: nothing a task leaves behind, and no task, outlives its supervisor.

::

    supervisor process                     zygote (PR_SET_CHILD_SUBREAPER, single-threaded)
    ──────────────────                     ───────────────────────────────────────────────
    spawn(payload, token*, grace) ───────▶ the spare (or a fork) becomes the task
                                             (PR_SET_PDEATHSIG=SIGKILL: it dies with us;
                                              spawn start method: a fork that execs python)
    guard(shim pidfd, token*, grace) ────▶ a fork task: watch its shim's pidfd
    status pipe ◀── raw status + rusage ─── SIGCHLD ▶ wait4 ▶ reap()
                                           a dead task's descendants reparent here: every child
                                             that is neither a task nor the spare is an orphan,
                                             SIGKILLed (tree and all) once its task's grace period
                                             has passed; a spare that dies is reaped silently
                                           (a fork task's orphans go to its shim, which runs
                                             this same Guardian for it: ``procsup._process.shim``)
    ✝ (SIGKILL, exit, crash) ── EOF ─────▶ SIGKILL the spare,
                                           cancel every ward's token ("supervisor died"),
                                           wait up to the grace period for them to exit,
                                           kill_trees() what is left, reap, exit

    token*: borrowed (``procsup._token.token.borrow_args``): the guardian holds no reference, so a
            token freed meanwhile reads as cancelled and nothing is released twice.

Things that don't work
----------------------
- ``PR_SET_PDEATHSIG`` in fork tasks instead: the signal follows the *thread* that forked the
  task, so any short-lived thread of the user that starts a task would kill it on exit; and a
  signal gives no grace period, where a token cancellation does.
- A watchdog thread in every task (polling ``getppid()``): a thread per task, and a poll.
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
from typing import Any

import psutil

from procsup._os import tree as _contain
from procsup._os.tree import exit_info

__all__ = ["STATUS", "Guardian", "children", "decode_status", "drain"]

# Raw wait status, peak RSS (bytes), CPU seconds: what a zygote task's status pipe carries.
STATUS = struct.Struct("iqd")
_REAP_AFTER_KILL = 5.0  # seconds the guardian waits for SIGKILLed processes before it exits


def decode_status(data: bytes) -> Any:
    """The ``ExitInfo`` a status pipe carried."""
    status, rss, cpu = STATUS.unpack(data)
    info = exit_info(status, None)
    return type(info)(info.exitcode, info.core_dumped, rss if rss >= 0 else None, cpu)


class _Ward:
    """One task the guardian answers for. ``token`` is borrowed (None in a shim); ``fd`` is the
    status pipe's write end (zygote tasks) or the pidfd of a fork task's shim."""

    __slots__ = ("fd", "grace", "pid", "token")

    def __init__(self, pid: int, fd: int, token: Any, grace: float) -> None:
        self.pid = pid
        self.fd = fd
        self.token = token
        self.grace = grace


class Guardian:
    """Zygote-side state: the wards (tasks), and orphans waiting for their grace period to end.

    Invariants: ``children`` maps each live zygote task's pid to its ward, ``watched`` each watched
    fork task's pidfd to its ward; ``spares`` holds the pids of unreaped spares (children forked
    ahead of a request, ``procsup._process.server``), never a task's; ``doomed`` is a heap of
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
        self.supervisor = os.getppid()

    def fds(self) -> list[int]:
        """Every fd the guardian holds (a forked task closes them)."""
        return [w.fd for w in [*self.children.values(), *self.watched.values()]]

    def add_child(self, pid: int, status_w: int, token: Any, grace: float) -> None:
        self.children[pid] = _Ward(pid, status_w, token, grace)

    def watch(self, pid: int, pidfd: int, token: Any, grace: float) -> None:
        """Answer for the fork task whose shim is ``pid``: its task's orphans are the shim's."""
        self.watched[pidfd] = _Ward(pid, pidfd, token, grace)

    def timeout(self) -> float | None:
        """Seconds until the next orphan is due, or None."""
        return max(0.0, self.doomed[0][0] - time.monotonic()) if self.doomed else None

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
            ward = self.children.pop(pid, None)
            if ward is None:
                # A doomed orphan exited: its own orphans come to us, on the same deadline.
                deadline = self.known.pop(pid, None)
                if deadline is not None:
                    deadlines.append(deadline)
                continue
            deadlines.append(now + ward.grace)
            info = exit_info(status, usage)
            rss = -1 if info.peak_rss is None else info.peak_rss
            with contextlib.suppress(OSError):  # EPIPE: the supervisor is gone
                os.write(ward.fd, STATUS.pack(status, rss, info.cpu_time or 0.0))
            os.close(ward.fd)
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
            if pid not in self.children and pid not in self.known and pid not in self.spares:
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
        """The supervisor's socket hit EOF: cancel every ward, grace, kill, reap. Then return.

        ``wait_fd`` becomes readable on SIGCHLD (the zygote's wake-up pipe).
        """
        wards = [*self.children.values(), *self.watched.values()]
        if not wards and not self.doomed and not self._orphans():
            return
        grace = max((w.grace for w in wards), default=0.0)
        reason = (
            f"procsup: the supervisor process (pid {self.supervisor}) died; "
            f"the task is killed after its {grace:g} s grace period"
        )
        for ward in wards:
            with contextlib.suppress(Exception):  # a corrupt arena must not save the task
                ward.token.cancel(reason)
        deadline = time.monotonic() + grace
        self._wait(wait_fd, deadline)
        # Every ward's tree at once: one freeze (a /proc scan a round) for all of them, so a
        # process forking in one tree cannot outrun the kill while the others are handled.
        # A fork task's shim is not our child: its pid is only ours to signal while its pidfd
        # says it has not exited.
        roots = [*self.children, *(w.pid for w in self.watched.values() if not _exited(w.fd))]
        victims = []
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                victims.append(psutil.Process(pid))
        end = time.monotonic() + _REAP_AFTER_KILL
        while True:  # until no child is left: killed ones may leave orphans as they die
            victims += [entry[2] for entry in self.doomed] + self._orphans()
            self.doomed.clear()
            _contain.kill_trees(victims)
            for ward in self.watched.values():
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(ward.fd, signal.SIGKILL)
            victims = []
            self._wait(wait_fd, end)
            if not children() or time.monotonic() >= end:
                break
            _wait_readable(wait_fd, min(0.1, max(0.0, end - time.monotonic())))

    def _wait(self, wait_fd: int, deadline: float) -> None:
        """Reap (and watch pidfds) until every ward has exited or ``deadline`` passes."""
        import select

        while self.children or self.watched:
            self.reap()
            for fd in [fd for fd in self.watched if _exited(fd)]:
                self.watched_exited(fd)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not (self.children or self.watched):
                break
            ready, _, _ = select.select([wait_fd, *self.watched], [], [], remaining)
            if wait_fd in ready:
                drain(wait_fd)
        self.reap()


def children() -> list[int]:
    """The pids of this process's children (zombies included)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: the slower scan
        return [p.pid for p in psutil.Process().children()]


def drain(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _wait_readable(fd: int, timeout: float) -> None:
    import select

    if select.select([fd], [], [], timeout)[0]:
        drain(fd)


def _exited(pidfd: int) -> bool:
    import select

    return bool(select.select([pidfd], [], [], 0)[0])
