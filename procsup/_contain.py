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
  subreaper above the supervisor). A task that returns or raises names its live descendants to the
  zygote (``hand_over()``: "pid start-time" lines on a pipe, checked against pid reuse), and the
  zygote, as guardian, kills them and whatever is still in the dead task's process group after the
  grace period. One gap is left: a descendant that left the group (``setsid()``, ``setpgid()``,
  ``start_new_session=True``) *and* outlives a fork task that died abruptly (a signal, or
  ``os._exit``) escapes, since nobody can name it any more. ``stop()``, ``shutdown()`` and a
  supervisor death do kill it: the task is still alive then, and a subreaper. Use the default start
  method for crash-prone work that starts daemons.

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

__all__ = [
    "ExitInfo",
    "enter_task",
    "exit_info",
    "hand_over",
    "heirs",
    "kill_tree",
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
    """In a fork task about to exit: name every live descendant ("pid start-time" lines) to the
    guardian, which kills them after the grace period. Cheap when there are none."""
    global heirs_fd
    fd, heirs_fd = heirs_fd, -1
    if fd < 0:
        return
    try:
        if _has_children():
            lines = [""]  # ends any line a descendant may have left unfinished on the pipe
            for proc in tree(os.getpid()):
                with contextlib.suppress(psutil.Error):
                    lines.append(f"{proc.pid} {proc.create_time()!r}")
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


def heirs(data: bytes) -> list[psutil.Process]:
    """The processes ``hand_over()`` named in ``data`` that still run (pid reuse checked)."""
    procs = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError, psutil.Error):
            pid, started = line.split()
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(started)) < 0.01:
                procs.append(proc)
    return procs


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
