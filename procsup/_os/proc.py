"""Linux process facts: how a task died, in words, and the calls that place and stop a process.

::

    exit status (``Process.exitcode``)     describe_exit(-9) ─▶ "killed by SIGKILL (signal 9): out
      n >= 0: exit code n                    of memory or killed externally", "SIGKILL"
      -s: killed by signal s               signal_name(s), and the signal's likely cause
    prctl(2)                               set_child_subreaper(), set_parent_death_signal(s)
    process groups and trees               detach_process_group(), signal_tree(pid, s)
    /proc/PID/stat, wchan                  proc_state(pid): "D (disk sleep ...), wchan ..."

The supervisor learns an exit status as multiprocessing reports it: this module turns that number
into the text of a ``TaskCrashedError`` and owns the OS calls around a task process: putting it in
its own process group, signalling its whole process tree, the prctl() calls of the zygote, the
shim and the task, and what ``/proc`` says of a process that will not die. procsup runs on Linux
only (``procsup._token.futex`` refuses to import elsewhere): nothing here has another branch.

Things that don't work
----------------------
- ``signal.strsignal()`` alone: it gives "Killed" or "Segmentation fault", never the name a user
  greps for, and says nothing about *why* (SIGKILL is nearly always the OOM killer).
- ``os.killpg()`` alone to stop a tree: a grandchild that called ``setsid()``/``setpgid()`` (a
  nested critical task does) leaves the group, so the tree is also walked with psutil.
- The ``Process.sentinel`` of a fork or spawn child as the death signal: it is a pipe whose write
  end the child holds, so a grandchild that inherits it delays the "death" until the grandchild
  exits too (pebble, loky and ProcessPoolExecutor notice ~4 s late here). A pidfd fires when the
  process itself exits. A zygote child's sentinel is fine: it is a status pipe that only the zygote
  holds, written after reaping; so is a ``ForkProcess``'s, written by its shim.
- Guessing a crash from exit code 1: CPython exits with 1 after an uncaught exception *and* the task
  may ``os._exit(1)``; only the absence of a reported outcome says "died without reporting".
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import sys
import traceback
from typing import Any

import psutil

__all__ = [
    "describe_exit",
    "detach_process_group",
    "enlarge_pipe",
    "human_size",
    "leave_if_forked",
    "proc_state",
    "set_child_subreaper",
    "set_parent_death_signal",
    "signal_name",
    "signal_tree",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

# Why a process usually dies of a signal, phrased for the person reading the traceback.
_LIKELY_CAUSE: dict[str, str] = {
    "SIGKILL": "out of memory or killed externally",
    "SIGSEGV": "invalid memory access, usually a bug in a C extension or ctypes code",
    "SIGABRT": "aborted: os.abort(), a failed C assertion or a fatal interpreter error",
    "SIGBUS": "bus error: a bad memory mapping, e.g. a file truncated under an mmap",
    "SIGFPE": "arithmetic error in native code, e.g. an integer division by zero",
    "SIGILL": "illegal instruction: native code built for another CPU, or corrupted memory",
    "SIGTERM": "terminated externally",
    "SIGINT": "interrupted",
    "SIGQUIT": "quit from the keyboard or killed externally",
    "SIGHUP": "its terminal or session went away",
    "SIGPIPE": "wrote to a pipe or socket nobody reads",
    "SIGXCPU": "CPU time limit exceeded",
    "SIGXFSZ": "file size limit exceeded",
    "SIGSYS": "forbidden system call (seccomp)",
    "SIGALRM": "an alarm went off with no handler installed",
    "SIGUSR1": "killed by a user-defined signal with no handler installed",
    "SIGUSR2": "killed by a user-defined signal with no handler installed",
}


# A lookup, not ``signal.Signals(signum).name``: the enum's Python-level machinery, on the path
# from a crash to the parent token's cancellation, was one more cold function call chain there.
_SIGNAL_NAMES = {int(sig): sig.name for sig in signal.Signals}


def signal_name(signum: int) -> str:
    """Return the conventional name of ``signum`` ("SIGKILL"), or "signal N" if it has none."""
    name = _SIGNAL_NAMES.get(signum)
    if name is not None:
        return name
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return f"signal {signum}"


def describe_exit(exitcode: int) -> tuple[str, str | None]:
    """Describe a task process that died without reporting an outcome.

    Args:
        exitcode: ``Process.exitcode``: ``-s`` for signal ``s``, else the exit code.

    Returns:
        ``(text, signal)``: ``text`` completes "Critical task 'x' crashed: ...", e.g. "killed by
        SIGKILL (signal 9): out of memory or killed externally"; ``signal`` is the signal's name,
        or None when the process exited rather than being killed.
    """
    if exitcode < 0:
        signum = -exitcode
        name = signal_name(signum)
        cause = _LIKELY_CAUSE.get(name, "killed externally")
        return f"killed by {name} (signal {signum}): {cause}", name
    if exitcode == 0:
        return (
            "exited with code 0 before reporting a result "
            "(os._exit(0) or a native exit(0) inside the task)",
            None,
        )
    return (
        f"exited with code {exitcode} without reporting a result "
        "(os._exit(), a native exit() or a fatal interpreter error)",
        None,
    )


def detach_process_group() -> None:
    """Put the calling process in a process group of its own, so a stop reaches its whole tree.

    Also keeps a Ctrl-C typed at the terminal away from the task: the terminal signals only the
    foreground group, the supervisor's, which cancels the tree instead.
    """
    # EPERM when the task already leads a session; it is then in a group of its own anyway.
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def signal_tree(pid: int, signum: int) -> None:
    """Send ``signum`` to process ``pid``, its process group and every descendant still alive.

    Never raises for processes that are already gone.
    """
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        descendants = []
    # The task leads its own group unless it has not reached detach_process_group() yet;
    # never signal a group the task does not lead (it would be the supervisor's).
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
    with contextlib.suppress(OSError):
        os.kill(pid, signum)
    for proc in descendants:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signum)


def enlarge_pipe(fd: int) -> None:
    """Grow a pipe's buffer to 1 MiB if ``/proc/sys/fs/pipe-max-size`` allows (EPERM otherwise:
    the pipe keeps its size), so big results cross in fewer wake-ups."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


@functools.cache
def _libc() -> Any:
    """The C library, loaded once: a zygote loads it before it forks, so no task pays for it."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> bool:
    import ctypes

    return bool(_libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0)


def set_child_subreaper() -> bool:
    """Make orphaned descendants of the calling process reparent to it, not to init (Linux >= 3.4).

    Even a descendant that called ``setsid()`` then stays below the caller while it lives, so a walk
    of its children finds the whole tree. Returns False if the kernel refused.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to the caller when the *thread* that forked it exits.

    Only safe in a child of a single-threaded parent (or of a thread that lives as long as its
    process): the signal follows the forking thread, not the process. Returns False if the kernel
    refused.
    """
    return _prctl(_PR_SET_PDEATHSIG, signum)


_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk sleep (uninterruptible)",
    "T": "stopped",
    "t": "tracing stop",
    "Z": "zombie",
    "X": "dead",
    "I": "idle",
}


def proc_state(pid: int) -> str:
    """Describe ``pid`` as ``/proc`` sees it: "D (disk sleep (uninterruptible)), wchan ...".

    "gone" if the process no longer exists; "unknown" where ``/proc`` is unavailable.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "unknown"
    state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
    text = f"{state} ({_STATES.get(state, 'unknown')})"
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
        if wchan and wchan != "0":
            text += f", wchan {wchan}"
    return text


def human_size(size: int) -> str:
    """``size`` bytes for people: "512 B", "1.9 GiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def leave_if_forked(owner: int, exc: BaseException | None) -> None:
    """After a task's (or an executor item's) call came back with ``exc`` (None: it returned): if
    this is not ``owner`` but a process the call forked that came back too (it returned, raised
    or called ``sys.exit()`` instead of ``os._exit``), it exits here as the end of a script
    would have ended it. It holds the owner's pipes: it must neither report an outcome for the
    task nor (in a worker) read the next items."""
    if os.getpid() == owner:
        return
    code = 0
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    elif exc is not None:
        traceback.print_exception(exc)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
