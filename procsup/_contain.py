"""Containing a task's process tree: what a task sets up, how its tree is killed, how it is reaped.

::

    task process (first thing in _task.main)     supervisor / zygote
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
  the grace period (``procsup._guardian``).
- fork: a task is forked by its shim, a fork of the supervisor that stays its parent and is a
  subreaper too (``procsup._shim``); it kills them the same way, then exits.

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

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import psutil

from procsup import _platform

__all__ = [
    "ExitInfo",
    "enter_task",
    "exit_info",
    "kill_tree",
    "kill_trees",
    "reap",
    "stuck",
    "tree",
]

_FREEZE_ROUNDS = 16  # walks before giving up on freezing a tree that keeps growing


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
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return ExitInfo(code, core, usage.ru_maxrss * scale, usage.ru_utime + usage.ru_stime)


def enter_task() -> None:
    """In a task process, before the task runs: keep every descendant below us while we live."""
    _platform.set_child_subreaper()


def reap(proc: Any) -> ExitInfo:
    """Wait for ``proc`` (a ``procsup._zygote`` lean process) and return how it ended."""
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
    if signum != signal.SIGKILL or sys.platform == "win32":
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
