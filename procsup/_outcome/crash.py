"""The crash record: what a ``TaskCrashedError`` says about a task that died without reporting.

::

    wait4() (monitor, or the zygote ─ status pipe) ─▶ ExitInfo: code, core dumped, peak RSS, CPU
    StderrTap (procsup._process.stdio)                      ─▶ stderr tail, faulthandler dump
    TaskRecord.started ... reaped                   ─▶ wall time
                     │
                     ▼
    describe(): the message, most useful first
        "killed by SIGKILL (signal 9) at 1.9 GiB peak RSS: likely the out-of-memory killer"
        "killed by SIGSEGV (signal 11) in parse() at mylib/reader.py:42: invalid memory access..."
    annotate(): the attributes of the error, and notes (shown under its traceback) with the
        numbers and the stderr tail

Things that don't work
----------------------
- Reading the kernel log for the OOM killer's verdict: ``/dev/kmsg`` needs privileges and a
  container rarely has it. The peak RSS against the memory available (the cgroup's limit, else
  the machine's) is the evidence we have, and the message says "likely".
- Putting the tail in the message: the message is also the parent token's cause (1 KiB at most)
  and a log line; the tail goes into the error's notes and ``stderr_tail``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Protocol

from procsup._os import proc as _platform
from procsup._os.proc import human_size
from procsup._os.tree import ExitInfo
from procsup._outcome.errors import CriticalTaskError, TaskCrashedError

__all__ = ["CrashedRun", "StderrRecord", "annotate", "crashed", "describe", "stopped"]


class StderrRecord(Protocol):
    """What the crash record reads of a task's stderr (``procsup._process.stdio.StderrTap``)."""

    def tail(self) -> str: ...

    def faulthandler_dump(self) -> str | None: ...


class CrashedRun(Protocol):
    """What the crash record reads of a run that died (``procsup._supervision.monitor``)."""

    @property
    def description(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def info(self) -> ExitInfo | None: ...

    @property
    def stderr(self) -> StderrRecord | None: ...

    @property
    def stop_reason(self) -> str | None: ...

    @property
    def limit_reason(self) -> str | None: ...

    @property
    def received(self) -> int:
        """Bytes of its result frame that arrived before it died."""
        ...


_OOM_SHARE = 0.5  # a SIGKILL at this share of the memory available is "likely" the OOM killer
_FRAME = re.compile(r'^\s+File "(?P<path>.+)", line (?P<line>\d+) in (?P<func>.+)$')


_AVAILABLE_TTL = 10.0  # seconds a reading of the memory available is reused
_available: tuple[float, int | None] = (-_AVAILABLE_TTL, None)  # (when read, what was read)


def _memory_available() -> int | None:
    """The cgroup v2 memory limit of this process, else the machine's memory, in bytes.

    Read at most every ``_AVAILABLE_TTL`` seconds: opening two files costs ~13 us here (warm),
    on the path from a SIGKILL to the parent's cancellation, and a limit rarely changes.
    """
    global _available
    now = time.monotonic()
    if now - _available[0] >= _AVAILABLE_TTL:
        _available = (now, _read_memory_available())
    return _available[1]


def _read_memory_available() -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{path}/memory.max") as f:
            text = f.read().strip()
        if text != "max":
            return int(text)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def crash_site(dump: str | None) -> str | None:
    """Where the crashing thread was, from a faulthandler dump: "parse() at mylib/reader.py:42".

    The innermost frame outside the standard library, or the innermost frame.
    """
    if not dump:
        return None
    lines = dump.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), -1)
    frames = []
    for line in lines[start + 1 :]:
        match = _FRAME.match(line)
        if match is None:
            break
        frames.append(match)
    if not frames:
        return None
    stdlib = (os.path.dirname(os.__file__), "<frozen ")
    match = next((m for m in frames if not m["path"].startswith(stdlib)), frames[0])
    path = match["path"]
    if path.startswith(os.getcwd() + os.sep):
        path = os.path.relpath(path)
    return f"{match['func']}() at {path}:{match['line']}"


def describe(
    exitcode: int | None, info: ExitInfo | None, tap: StderrRecord | None, stopped: bool = False
) -> tuple[str, str | None]:
    """``(text, signal)`` for "Critical task 'x' crashed: <text>", most useful first."""
    text, sig = _platform.describe_exit(255 if exitcode is None else exitcode)
    if sig is None:
        return text, sig
    head, _, cause = text.partition(": ")  # "killed by SIGKILL (signal 9)", its likely cause
    if info is not None and info.core_dumped:
        head = head[:-1] + ", core dumped)"
    if sig == "SIGKILL" and info is not None and info.peak_rss:
        head += f" at {human_size(info.peak_rss)} peak RSS"
        available = _memory_available()
        if not stopped and available and info.peak_rss >= _OOM_SHARE * available:
            cause = "likely the out-of-memory killer"
    site = crash_site(tap.faulthandler_dump() if tap is not None else None)
    if site is not None:
        head += f" in {site}"
    return f"{head}: {cause}", sig


def annotate(
    error: TaskCrashedError,
    info: ExitInfo | None,
    started: float,
    tap: StderrRecord | None,
    ended: float | None = None,
) -> None:
    """Fill in the crash record of ``error`` and add notes with the numbers and the stderr tail.

    ``started``, ``ended``: ``time.monotonic()`` at the start and at the reaping (None: now).
    """
    error.wall_time = (time.monotonic() if ended is None else ended) - started
    if info is not None:
        error.core_dumped = info.core_dumped
        error.peak_rss = info.peak_rss
        error.cpu_time = info.cpu_time
    if tap is not None:
        error.stderr_tail = tap.tail()
        error.faulthandler_dump = tap.faulthandler_dump()
    facts = [f"pid {error.pid}", f"exit code {error.exitcode}"]
    if error.signal is not None:
        facts.append(f"signal {error.signal}" + (" (core dumped)" if error.core_dumped else ""))
    if error.peak_rss is not None:
        facts.append(f"peak RSS {human_size(error.peak_rss)}")
    facts.append(f"wall {error.wall_time:.2f} s")
    if error.cpu_time is not None:
        facts.append(f"CPU {error.cpu_time:.2f} s")
    error.add_note("crash record: " + ", ".join(facts))
    if error.stderr_tail:
        error.add_note("last lines of the task's stderr:\n" + error.stderr_tail)


def crashed(task: CrashedRun, exitcode: int | None) -> TaskCrashedError:
    """The error of a task that died without reporting an outcome."""
    text, sig = describe(exitcode, task.info, task.stderr)
    if task.limit_reason is not None:
        text = f"{task.limit_reason}, then {text.split(':')[0]}"
    if task.received:
        text += f"; it had sent {task.received} bytes of its result"
    return TaskCrashedError(
        f"Critical task '{task.description}' crashed: {text} (pid {task.pid})",
        description=task.description,
        pid=task.pid,
        exitcode=exitcode,
        signal=sig,
    )


def stopped(task: CrashedRun, exitcode: int | None, error: CriticalTaskError) -> TaskCrashedError:
    """The error of a task that procsup had to signal (``stop()``, ``shutdown()``, a timeout)."""
    text, sig = describe(exitcode, task.info, task.stderr, stopped=True)
    how = text.split(":")[0]  # "killed by SIGTERM (signal 15)", without the likely cause
    stopped = TaskCrashedError(
        f"Critical task '{task.description}' was stopped on request: {task.stop_reason}, "
        f"then {how} (pid {task.pid})",
        description=task.description,
        pid=task.pid,
        exitcode=exitcode,
        signal=sig,
        stopped=True,
    )
    if not isinstance(error, TaskCrashedError):
        stopped.__cause__ = error
    return stopped
