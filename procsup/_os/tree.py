"""Containing a task's process tree: what a task sets up, how its tree is killed, how it is reaped.

::

    task process (first thing in entry.main)     supervisor / zygote
    ────────────────────────────────────────     ───────────────────
    PR_SET_CHILD_SUBREAPER: orphans of its        kill_tree(pid): freeze the tree with SIGSTOP,
      descendants (setsid() ones included)          walking it again until no new process
      reparent to the task, so while the task       appears, then SIGKILL every one of them
      lives psutil.children(recursive=True)       reap(proc): wait4 -> ExitInfo (exit code,
      sees its whole tree                           core dumped, peak RSS, CPU time)
                                                  stuck(pids): what /proc says of survivors

Where the orphans of a *dead* task go, and who kills them after the grace period:

- forkserver and spawn (procsup's zygote forks both): the zygote is a subreaper too; a dead
  task's surviving descendants reparent to it, and it kills every child that is not a task after
  the grace period (``procsup._process.guardian``).
- fork: a task is forked by its shim, a fork of the supervisor that stays its parent and is a
  subreaper too (``procsup._process.shim``); it kills them the same way, then exits.

Things that don't work
----------------------
- Killing the process groups of a task's descendants: a descendant may join (``setpgid()``) a
  group of strangers in the same session. A session cannot be joined, only inherited, so one
  started inside a task's tree holds nothing else: ``kill_trees`` kills those whole.
- One /proc scan per tree when many die at once (200 orphans of one task): the zygote, single-
  threaded, stalled starts for seconds. ``kill_trees`` walks all of them in one scan per round.
- Signalling a tree in one pass: a process that forks between the walk and the signal (a fork bomb,
  a shell starting its pipeline) has a child nobody saw. SIGSTOP first, walk again until the walk
  finds nothing new, then SIGKILL.
- ``os.killpg()`` alone: a descendant that called ``setsid()`` leaves the group.
- ``waitpid()`` for the crash record: it loses the resource usage; ``wait4()`` has it (peak RSS
  included) at no extra cost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from procsup._os import proc as _platform

__all__ = [
    "KILL_AFTER",
    "KILL_WAIT",
    "REAP_DEADLINE",
    "ExitInfo",
    "Ladder",
    "Rung",
    "enter_task",
    "exit_info",
    "kill_tree",
    "kill_trees",
    "reap",
    "stuck",
    "tree",
]

logger = logging.getLogger("procsup")

_FREEZE_ROUNDS = 16  # walks before giving up on freezing a tree that keeps growing
KILL_AFTER = 1.0  # seconds between SIGTERM and SIGKILL
KILL_WAIT = 3.0  # seconds after SIGKILL before a survivor is reported (a process in D state)
REAP_DEADLINE = 30.0  # after SIGKILL; only a process stuck in the kernel (D state) takes longer


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended, as ``wait4()`` reports it.

    Attributes:
        exitcode: As ``Process.exitcode``: ``-N`` for signal N, else the exit code.
        core_dumped: True if the kernel wrote (or piped) a core dump.
        peak_rss: Peak resident set size in bytes, or None if unknown.
        cpu_time: User plus system CPU seconds, or None if unknown.
    """

    exitcode: int
    core_dumped: bool = False
    peak_rss: int | None = None
    cpu_time: float | None = None


def exit_info(status: int, usage: Any | None) -> ExitInfo:
    """Build an ``ExitInfo`` from a raw wait status and a ``resource.struct_rusage`` (or None)."""
    code = os.waitstatus_to_exitcode(status)
    core = os.WIFSIGNALED(status) and os.WCOREDUMP(status)
    if usage is None:
        return ExitInfo(code, core)
    # ru_maxrss is in KiB on Linux.
    return ExitInfo(code, core, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def enter_task() -> None:
    """In a task process, before the task runs: keep every descendant below us while we live."""
    _platform.set_child_subreaper()


def reap(proc: Any) -> ExitInfo:
    """Wait for ``proc`` (a ``procsup._process.zygote`` lean process) and return how it ended."""
    proc.join()
    info: ExitInfo | None = proc.info
    return info or ExitInfo(255 if proc.exitcode is None else proc.exitcode)


def tree(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty if it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _send(proc: psutil.Process, signum: int) -> None:
    # psutil checks the process's creation time first: a recycled pid is never signalled.
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(signum)


def kill_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to ``pid``, its process group and every descendant; never raises.

    For SIGKILL the tree is frozen first (``kill_trees``).
    """
    if signum != signal.SIGKILL:
        _platform.signal_tree(pid, signum)
        return
    try:
        root = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        _platform.signal_tree(pid, signum)
        return
    kill_trees([root])


def kill_trees(roots: list[psutil.Process]) -> None:
    """SIGKILL each of ``roots`` still running, the process group it leads, and every descendant;
    never raises. The trees are frozen first (SIGSTOP, then walked again until a walk finds
    nothing new), so a process forking at the wrong moment cannot leave a child behind; a session
    started inside them is killed whole as soon as a walk meets it. A walk is one scan of /proc
    for all the trees (zombies left out): a hundred trees cost a few scans, not a few hundred."""
    seen: dict[int, psutil.Process] = {}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                seen[proc.pid] = proc
                _send(proc, signal.SIGSTOP)
    if not seen:
        return
    leaders = list(seen)
    # Sessions started inside the trees are killed whole, on sight (``_kill_session``): a
    # setsid() process that forks and exits faster than a walk would keep a freeze from ever
    # settling, and is still in its session. Not ours to kill whole: our own session, and the
    # session of a root that did not start it.
    outside = {os.getsid(0)}
    for pid in leaders:
        with contextlib.suppress(OSError):
            if os.getsid(pid) != pid:
                outside.add(os.getsid(pid))
    killed: set[int] = set()

    def kill_sessions(procs: list[psutil.Process]) -> None:
        for proc in procs:
            with contextlib.suppress(OSError):
                sid = os.getsid(proc.pid)
                if sid not in outside and sid not in killed:
                    killed.add(sid)
                    _kill_session(sid, seen)

    kill_sessions(list(seen.values()))
    for _ in range(_FREEZE_ROUNDS):
        new = _descendants(seen)
        if not new:
            break
        for proc in new:
            seen[proc.pid] = proc
            _send(proc, signal.SIGSTOP)
        kill_sessions(new)
    for pid in leaders:  # the groups too: members that left the trees
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
    for proc in seen.values():
        _send(proc, signal.SIGKILL)


def _kill_session(sid: int, seen: dict[int, psutil.Process]) -> None:
    """SIGKILL every live member of session ``sid`` on sight, adding each to ``seen``, scanning
    again until a scan finds none. Each process group in it is signalled whole: the kernel fails
    a fork that a group signal interrupts, so a member forking every few milliseconds cannot
    outrun it the way it outruns a scan. Nothing is frozen first: every member descends from
    the trees being killed (see ``kill_trees``), and what a killed member leaves stays in the
    session."""
    for _ in range(_FREEZE_ROUNDS):
        live = []
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(OSError):
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                    live.append(proc)
        if not live:
            return
        groups = set()
        for proc in live:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(proc.pid))
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        seen.update((proc.pid, proc) for proc in live)


def _descendants(known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """Every live descendant of the processes in ``known`` that is not in it (one /proc scan)."""
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE:  # dead, and its children are elsewhere
            children.setdefault(proc.info["ppid"], []).append(proc)
    found = []
    visited = set(known)
    stack = list(known)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.pid not in visited:
                visited.add(child.pid)
                found.append(child)
                stack.append(child.pid)
    return found


def stuck(pids: list[int]) -> list[str]:
    """Describe each of ``pids`` still alive: "pid 123: D (disk sleep ...), wchan ..."."""
    report = []
    for pid in pids:
        state = _platform.proc_state(pid)
        if state != "gone" and not state.startswith(("Z", "X")):
            report.append(f"pid {pid}: {state}")
    return report


class Rung(Protocol):
    """One process tree a ``Ladder`` stops: a task's, seen by whoever answers for it."""

    def cancel(self) -> None:
        """Ask it to stop: cancel its token."""

    def exited(self) -> bool:
        """True once its root process has exited (and may be reaped: its pid is no longer ours)."""
        ...

    def terminate(self) -> None:
        """SIGTERM its tree, unless it has exited (never a recycled pid)."""

    def roots(self) -> list[psutil.Process]:
        """The live roots of its tree, for ``kill_trees`` (empty once it has exited)."""
        ...

    def stuck(self) -> list[str]:
        """What ``/proc`` says of it if it is still alive (``stuck()``), else nothing."""
        ...


class Ladder:
    """The one way procsup stops process trees, for ``stop()``, ``shutdown()``, a run's timeout
    and the guardian of a dead supervisor:

    cancel ─▶ ``grace`` s ─▶ SIGTERM the trees ─▶ ``KILL_AFTER`` s ─▶ freeze and SIGKILL them
    (``kill_trees``, all at once) ─▶ ``KILL_WAIT`` s ─▶ report (and log) what still lives.

    Driven by whoever owns a clock: ``step()`` does what is due and returns the
    ``time.monotonic()`` at which it wants to be called again, or None once finished (or, with
    ``grace=None``, once the trees are asked to stop and nothing more is ever due). A step
    that finds every tree exited finishes the ladder at once, whatever is due. One thread drives
    a ladder; ``done`` is set, with the survivors' descriptions, when it finishes.
    """

    def __init__(
        self,
        rungs: Iterable[Rung],
        grace: float | None,
    ) -> None:
        self._rungs = list(rungs)
        self._waits = (grace, KILL_AFTER, KILL_WAIT)
        self._stage = 0  # the next action: 0 cancel, 1 SIGTERM, 2 SIGKILL, 3 report, 4 finished
        self._due = 0.0
        self.done: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self.done.set_running_or_notify_cancel()

    def step(self, now: float | None = None) -> float | None:
        """Do every action that is due by ``now`` (default: the monotonic clock)."""
        now = time.monotonic() if now is None else now
        while self._stage < 4:
            live = [rung for rung in self._rungs if not rung.exited()]
            if not live and (self._stage > 0 or not self._rungs):
                self._finish([])
                break
            if now < self._due:
                return None if math.isinf(self._due) else self._due
            if self._stage == 0:
                for rung in self._rungs:
                    rung.cancel()
            elif self._stage == 1:
                for rung in live:
                    rung.terminate()
            elif self._stage == 2:
                kill_trees([root for rung in live for root in rung.roots()])
            else:
                stuck = [line for rung in live for line in rung.stuck()]
                if stuck:
                    logger.error("still alive after SIGKILL: %s", "; ".join(stuck))
                self._finish(stuck)
                break
            wait = self._waits[self._stage]
            self._stage += 1
            if wait is None:  # no grace limit: asked to stop, and left to do so for ever
                self._due = math.inf
                return None
            self._due = now + wait
        return None

    def _finish(self, stuck: list[str]) -> None:
        self._stage = 4
        if not self.done.done():
            self.done.set_result(stuck)
