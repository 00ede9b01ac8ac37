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
- fork: tasks are children of the user's process, which procsup does not make a subreaper (that
  would change what the user's own ``wait()`` calls see). Orphans reparent to init (or the nearest
  subreaper above the supervisor). A task that returns or raises names its live descendants and
  their process groups to the zygote (``hand_over()``: lines on a pipe, start times against pid
  reuse), and the zygote, as guardian, kills them after the grace period, and the dead task's
  group and theirs whole (``kill_group``: a process that forks and exits to change its pid stays
  in its group). One gap is left: a descendant that left the group (``setsid()``, ``setpgid()``,
  ``start_new_session=True``) *and* outlives a fork task that died abruptly (a signal, or
  ``os._exit``) escapes, since nobody can name it any more. ``stop()``, ``shutdown()`` and a
  supervisor death do kill it: the task is still alive then, and a subreaper. Use the default start
  method for crash-prone work that starts daemons.

Things that don't work
----------------------
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
    "hand_over",
    "heirs",
    "kill_group",
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


heirs_fd = -1  # in a fork task: the pipe to the guardian (``procsup._zygote.ForkProcess``)


def enter_task() -> None:
    """In a task process, before the task runs: keep every descendant below us while we live."""
    _platform.set_child_subreaper()


def hand_over() -> None:
    """In a fork task about to exit: name every live descendant ("p pid start-time" lines) and
    the process groups they are in ("g pgid leader's-start-time-or--") to the guardian, which
    kills them after the grace period. Cheap when there are none."""
    global heirs_fd
    fd, heirs_fd = heirs_fd, -1
    if fd < 0:
        return
    try:
        if _has_children():
            lines = [""]  # ends any line a descendant may have left unfinished on the pipe
            pids, groups = set(), set()
            for proc in tree(os.getpid()):
                with contextlib.suppress(OSError, psutil.Error):
                    lines.append(f"p {proc.pid} {proc.create_time()!r}")
                    pids.add(proc.pid)
                    groups.add(os.getpgid(proc.pid))
            for pgid in groups - {os.getpgid(0)}:  # our own group is the guardian's already
                # Only groups led by one of ours, or whose leader is gone: never one led by a
                # process outside our tree (a descendant may have joined our parent's group).
                try:
                    leader = repr(psutil.Process(pgid).create_time())
                except psutil.NoSuchProcess:
                    leader = "-"
                except psutil.Error:
                    continue
                if leader == "-" or pgid in pids:
                    lines.append(f"g {pgid} {leader}")
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):  # a full pipe (64 KiB of names): the rest escape
                os.write(fd, "\n".join([*lines, ""]).encode())
    finally:
        os.close(fd)


def _has_children() -> bool:
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                if f.read().strip():
                    return True
        return False
    except OSError:  # no CONFIG_PROC_CHILDREN
        return True


def heirs(data: bytes) -> tuple[list[psutil.Process], dict[int, float | None]]:
    """What ``hand_over()`` named in ``data``: the processes that still run (pid reuse checked),
    and each group with its leader's start time (None: the leader was gone)."""
    procs, groups = [], {}
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError, psutil.Error):
            kind, number, started = line.split()
            if kind == "g":
                groups[int(number)] = None if started == "-" else float(started)
            elif kind == "p":
                proc = psutil.Process(int(number))
                if abs(proc.create_time() - float(started)) < 0.01:
                    procs.append(proc)
    return procs, groups


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
    nothing new), so a process forking at the wrong moment cannot leave a child behind. A walk is
    one scan of /proc for all the trees: a hundred trees cost a few scans, not a few hundred."""
    seen: dict[int, psutil.Process] = {}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                seen[proc.pid] = proc
                _send(proc, signal.SIGSTOP)
    if not seen:
        return
    leaders = list(seen)
    for _ in range(_FREEZE_ROUNDS):
        new = _descendants(seen)
        if not new:
            break
        for proc in new:
            seen[proc.pid] = proc
            _send(proc, signal.SIGSTOP)
    for pid in leaders:  # the groups too: members that left the trees
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
    for proc in seen.values():
        _send(proc, signal.SIGKILL)


def kill_group(pgid: int, leader: float | None, protect: tuple[int, ...]) -> None:
    """SIGKILL process group ``pgid`` whole, trees and all; never raises.

    ``leader``: the start time of the group's leader when the group was recorded, None if it was
    gone then. A group id is not reused while the group has members, so a live process with that
    pid and another start time means the group is gone and the pid recycled: then nothing is sent.
    Nor if one of the ``protect`` pids is in the group (the supervisor, the guardian itself).
    """
    for pid in protect:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid:
                return
    try:
        started: float | None = psutil.Process(pgid).create_time()
    except psutil.NoSuchProcess:
        started = None
    except psutil.Error:
        return
    if started is not None and (leader is None or abs(started - leader) > 0.01):
        return
    try:
        os.killpg(pgid, signal.SIGSTOP)
    except OSError:
        return  # ESRCH: no member left
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
    kill_trees(members)
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def _descendants(known: dict[int, psutil.Process]) -> list[psutil.Process]:
    """Every live descendant of the processes in ``known`` that is not in it (one /proc scan)."""
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
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
