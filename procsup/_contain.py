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

- forkserver (procsup's zygote): the zygote is a subreaper too; a dead task's surviving
  descendants reparent to it, and it kills every child that is not a task after the grace period
  (``procsup._guardian``).
- fork and spawn: tasks are children of the user's process, which procsup does not make a
  subreaper (that would change what the user's own ``wait()`` calls see). Orphans reparent to init
  (or the nearest subreaper above the supervisor); the zygote, as guardian, kills those still in the
  dead task's process group after the grace period. A descendant that left the group
  (``setsid()``, ``setpgid()``, ``start_new_session=True``) *and* outlives a task that died without
  procsup killing its tree (a crash, or a normal return) escapes. ``stop()``, ``shutdown()`` and a
  supervisor death do kill it: the task is still alive then, and a subreaper. Use the default start
  method where that matters.

Things that don't work
----------------------
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

__all__ = ["ExitInfo", "enter_task", "exit_info", "kill_tree", "reap", "stuck", "tree"]

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
    """Wait for ``proc`` (a lean process or a ``multiprocessing.Process``) and reap it.

    Lean processes (``procsup._zygote``) know their ``ExitInfo`` once joined; a multiprocessing
    child is reaped here with ``wait4`` and its Popen told the exit code.
    """
    info = getattr(proc, "info", None)
    if info is None and hasattr(proc, "_popen"):
        popen = proc._popen
        if popen is not None and popen.returncode is None:
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except ChildProcessError:  # reaped by someone else: the status is lost
                proc.join()
            else:
                info = exit_info(status, usage)
                popen.returncode = info.exitcode
    proc.join()
    info = info or getattr(proc, "info", None)
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

    For SIGKILL the tree is frozen first (SIGSTOP, walked again until nothing new appears), so a
    process forking at the wrong moment cannot leave a child behind.
    """
    if signum != signal.SIGKILL or sys.platform == "win32":
        _platform.signal_tree(pid, signum)
        return
    try:
        root = psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        _platform.signal_tree(pid, signum)
        return
    seen: dict[int, psutil.Process] = {pid: root}
    _send(root, signal.SIGSTOP)
    for _ in range(_FREEZE_ROUNDS):
        new = [p for p in tree(pid) if p.pid not in seen]
        if not new:
            break
        for proc in new:
            seen[proc.pid] = proc
            _send(proc, signal.SIGSTOP)
    _platform.signal_tree(pid, signal.SIGKILL)  # the group too: members that left the tree
    for proc in seen.values():
        _send(proc, signal.SIGKILL)


def stuck(pids: list[int]) -> list[str]:
    """Describe each of ``pids`` still alive: "pid 123: D (disk sleep ...), wchan ..."."""
    report = []
    for pid in pids:
        state = _platform.proc_state(pid)
        if state != "gone" and not state.startswith(("Z", "X")):
            report.append(f"pid {pid}: {state}")
    return report
