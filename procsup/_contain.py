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
  the sessions they started to the zygote (``hand_over()``: lines on a pipe, start times against
  pid reuse), and the zygote, as guardian, kills them after the grace period, the dead task's
  process group and those sessions whole (a process that forks and exits to change its pid stays
  in both). A group or session that emptied and whose number a stranger reused within the grace
  period (pid wrap-around) would be taken for the task's: the leader's start time is checked, a
  leaderless group's cannot be. One gap is left: a descendant that left the group (``setsid()``,
  ``setpgid()``, ``start_new_session=True``) *and* outlives a fork task that died abruptly (a
  signal, or ``os._exit``) escapes, since nobody can name it any more. ``stop()``, ``shutdown()``
  and a supervisor death do kill it: the task is still alive then, and a subreaper. Use the
  default start method for crash-prone work that starts daemons.

Things that don't work
----------------------
- Killing the process groups of a task's descendants: a descendant may join (``setpgid()``) a
  group of strangers in the same session. A session cannot be joined, only inherited, so one
  started inside a task's tree holds nothing else: ``kill_trees`` and the guardian kill those.
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
    "kill_session",
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
    every session one of them started ("s sid leader's-start-time-or--") to the guardian, which
    kills them after the grace period. Cheap when there are none.

    A session other than ours that holds a descendant of ours was started (``setsid()``) inside
    our tree, and a session cannot be joined, only inherited: every member is a descendant of
    ours. Killing it whole catches a process that forks and exits to change its pid; naming a
    process group instead could name one a descendant joined (``setpgid()``) with strangers in it.
    """
    global heirs_fd
    fd, heirs_fd = heirs_fd, -1
    if fd < 0:
        return
    try:
        if _has_children():
            lines = [""]  # ends any line a descendant may have left unfinished on the pipe
            sessions = set()
            for proc in tree(os.getpid()):
                with contextlib.suppress(OSError, psutil.Error):
                    lines.append(f"p {proc.pid} {proc.create_time()!r}")
                    sessions.add(os.getsid(proc.pid))
            for sid in sessions - {os.getsid(0)}:
                try:
                    leader = repr(psutil.Process(sid).create_time())
                except psutil.NoSuchProcess:
                    leader = "-"
                except psutil.Error:
                    continue
                lines.append(f"s {sid} {leader}")
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
    and each session with its leader's start time (None: the leader was gone)."""
    procs, sessions = [], {}
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError, psutil.Error):
            kind, number, started = line.split()
            if kind == "s":
                sessions[int(number)] = None if started == "-" else float(started)
            elif kind == "p":
                proc = psutil.Process(int(number))
                if abs(proc.create_time() - float(started)) < 0.01:
                    procs.append(proc)
    return procs, sessions


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
    # Sessions started inside the trees, whole (see hand_over): a setsid() process that forks
    # and exits faster than a walk lost it is still in its session.
    # Not ours to kill whole: our own session, and the session of a root that did not start it.
    outside = {os.getsid(0)}
    for pid in leaders:
        with contextlib.suppress(OSError):
            if os.getsid(pid) != pid:
                outside.add(os.getsid(pid))
    inside = set()
    for proc in seen.values():
        with contextlib.suppress(OSError):
            inside.add(os.getsid(proc.pid))
    for sid in inside - outside:
        _kill_session(sid, seen)
    for proc in seen.values():
        _send(proc, signal.SIGKILL)


def kill_session(sid: int, leader: float | None) -> None:
    """SIGKILL every process of session ``sid``, trees and all; never raises.

    ``leader``: the start time of the session's leader when the session was named, None if it was
    gone then; nothing is sent if the id now names a stranger (``_recycled``).
    """
    if _recycled(sid, leader):
        return
    seen: dict[int, psutil.Process] = {}
    _kill_session(sid, seen)
    kill_trees(list(seen.values()))


def _kill_session(sid: int, seen: dict[int, psutil.Process]) -> None:
    """Freeze every member of session ``sid`` (scanning again until none is new), adding each to
    ``seen``, then SIGKILL them."""
    members: dict[int, psutil.Process] = {}
    for _ in range(_FREEZE_ROUNDS):
        new = []
        for proc in psutil.process_iter():
            with contextlib.suppress(OSError):
                if proc.pid not in members and os.getsid(proc.pid) == sid:
                    new.append(proc)
        if not new:
            break
        for proc in new:
            members[proc.pid] = proc
            _send(proc, signal.SIGSTOP)
    seen.update(members)
    for proc in members.values():
        _send(proc, signal.SIGKILL)


def kill_group(pgid: int, leader: float | None, protect: tuple[int, ...]) -> None:
    """SIGKILL process group ``pgid`` whole, trees and all; never raises.

    ``leader``: the start time of the group's leader when the group was recorded, None if it was
    gone then; nothing is sent if the id now names a stranger (``_recycled``), nor if one of the
    ``protect`` pids is in the group (the supervisor, the guardian itself).
    """
    for pid in protect:
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid:
                return
    if _recycled(pgid, leader):
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


def _recycled(ident: int, leader: float | None) -> bool:
    """Whether the group or session id ``ident`` now names a stranger: a live process has that
    pid but not the start time ``leader`` its leader had when it was recorded (None: the leader
    was gone then). True too when it cannot be told. An id is not reused while it has members,
    so no such process means the members, if any, are the ones recorded."""
    try:
        started = psutil.Process(ident).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return leader is None or abs(started - leader) > 0.01


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
