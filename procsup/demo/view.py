"""What the demo shows: task rows sampled from ``Supervisor.tasks()``, and three event printers.

::

    demo runner (event loop thread)
      ├─ Sampler.sample(rows, sup.tasks()) every 0.25 s ── state, pid (across restarts), restarts,
      │      RSS, CPU% from the snapshots; psutil adds what they lack: CPU time, peak RSS (VmHWM),
      │      descendants (a nested task's sub-task)
      ├─ view.status(rows) ──▶ RichView: a rich Live table redrawn in place (TTY, rich installed)
      │                        PlainView: timestamped lines, one block per second
      │                        JsonView: a "status" object per second
      └─ view.event(kind, text, **fields) ──▶ a styled line / a timestamped line / one JSON object

rich is optional (the ``demo`` extra): it is imported here only, and only when the output is a
terminal; without it the plain view is used. The library never imports this module.

Things that don't work
----------------------
- RSS as the peak (``TaskSnapshot.rss`` or psutil's): a sampled RSS misses a spike between samples;
  the kernel's high-water mark (``VmHWM`` in ``/proc/<pid>/status``) does not.
- ``Supervisor.tasks()`` alone: a task whose outcome is published leaves it, so a row keeps its
  last sample; and it has no CPU time, peak RSS or descendants.
- Printing from the tasks: they share the terminal, and under ``--json`` any stray line corrupts
  the stream; tasks report through their return value instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from procsup import TaskSnapshot

__all__ = ["JsonView", "PlainView", "Row", "Sampler", "View", "make_view"]

_STATUS_EVERY = 1.0  # seconds between status blocks in the line-oriented views


@dataclass
class Row:
    """One task as the demo shows it, across its runs.

    Invariants: ``ended`` is None until the final outcome (a process may live); ``pid`` is the
    current or last run's; ``peak_rss`` is the highest of any run; ``cpu_time`` counts every run,
    ``cpu_before`` the runs before the current one.
    """

    description: str
    pid: int
    started: float
    state: str = "running"
    ended: float | None = None
    exitcode: int | None = None
    restarts: int = 0
    rss: int = 0
    peak_rss: int = 0
    cpu_percent: float = 0.0
    cpu_time: float = 0.0
    cpu_before: float = 0.0
    detail: str = ""
    subtasks: list[tuple[int, str, int]] = field(default_factory=list)  # (pid, name, rss)

    def uptime(self, now: float) -> float:
        """Seconds the task ran: until it ended, or until ``now``."""
        return (self.ended if self.ended is not None else now) - self.started

    def as_dict(self, now: float) -> dict[str, Any]:
        """The row as JSON-ready fields."""
        return {
            "task": self.description,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "uptime": round(self.uptime(now), 3),
            "rss": self.rss,
            "peak_rss": self.peak_rss,
            "cpu_percent": round(self.cpu_percent, 1),
            "cpu_time": round(self.cpu_time, 3),
            "exitcode": self.exitcode,
            "subtasks": [{"pid": p, "name": n, "rss": r} for p, n, r in self.subtasks],
        }


def mib(size: int) -> str:
    """``size`` bytes as "12.3 MiB"."""
    return f"{size / 2**20:.1f} MiB"


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Sampler:
    """Samples live rows from ``Supervisor.tasks()`` and psutil; an ended row keeps its last sample.

    Descendants are shown when their process name starts with ``prefix``: the demo's tasks name
    themselves, and a forkserver's children share its command line, so that cannot tell a nested
    task from multiprocessing's own helpers.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, rows: list[Row], snapshots: list[TaskSnapshot]) -> None:
        """Refresh every row that has not ended from its snapshot (matched by description)."""
        live = {snap.description: snap for snap in snapshots}
        for row in rows:
            snap = live.get(row.description)
            if row.ended is not None or snap is None:  # ended, or its outcome is being published
                continue
            row.state, row.restarts = snap.state, snap.restarts
            if snap.pid is None:  # waiting out its backoff
                row.rss, row.cpu_percent, row.subtasks = 0, 0.0, []
                continue
            row.pid = snap.pid
            # An exited, not yet reaped process reads as 0 bytes or None: keep the last figure.
            row.rss = snap.rss or row.rss
            row.cpu_percent = row.cpu_percent if snap.cpu_percent is None else snap.cpu_percent
            self._psutil(row)

    def _psutil(self, row: Row) -> None:
        proc = self._procs.get(row.pid)
        try:
            if proc is None:
                proc = self._procs[row.pid] = psutil.Process(row.pid)
            with proc.oneshot():
                times = proc.cpu_times()
                row.cpu_time = row.cpu_before + times.user + times.system
            row.peak_rss = max(row.peak_rss, _peak_rss(row.pid), row.rss)
            row.subtasks = [
                (child.pid, name, child.memory_info().rss)
                for child in proc.children(recursive=True)
                if (name := child.name()).startswith(self._prefix)
            ]
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            row.subtasks = []


class View:
    """Base view: timestamps relative to the demo's start, and the interface the runner uses."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.t0 = time.monotonic()
        self._last_status = -_STATUS_EVERY

    def now(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.t0

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Report one event; ``fields`` are JSON-ready. A ``record`` dict is shown as a block."""
        raise NotImplementedError

    def status(self, rows: list[Row]) -> None:
        """Show the rows; line views do so at most once per second."""
        now = self.now()
        if now - self._last_status >= _STATUS_EVERY:
            self._last_status = now
            self._status(rows, now)

    def _status(self, rows: list[Row], now: float) -> None:
        raise NotImplementedError

    def refresh(self, rows: list[Row]) -> None:
        """A state changed: redraw a live display now (line views wait for their next status)."""

    def summary(self, rows: list[Row]) -> None:
        """Show the final table."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop any live display (idempotent)."""

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # The reader left (``| head``): the tasks still shut down properly, unseen. Point fd 1
            # at /dev/null too, so the interpreter's last flush at exit does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)


class JsonView(View):
    """One JSON object per line, in the order things happened; ``t`` is seconds since start."""

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Write ``{"t", "event", ..., "text"}`` on one line."""
        obj = {"t": round(self.now(), 3), "event": kind, **fields, "text": text}
        self._write(json.dumps(obj, default=str))

    def _status(self, rows: list[Row], now: float) -> None:
        self.event("status", f"{len(rows)} tasks", tasks=[row.as_dict(now) for row in rows])

    def summary(self, rows: list[Row]) -> None:
        """Write a "summary" event whose ``tasks`` are the final rows."""
        now = self.now()
        self.event("summary", "final state", tasks=[row.as_dict(now) for row in rows])


def table_lines(rows: list[Row], now: float, final: bool = False) -> list[str]:
    """The rows as a fixed-width text table (the plain view's status block and summary)."""
    width = max([len(row.description) for row in rows] + [4])
    cpu_head, last = ("cpu time", "result") if final else ("cpu", "sub-tasks")
    lines = [
        f"{'task':<{width}}  {'pid':>7}  {'state':<10} {'restarts':>8} {'uptime':>7} {'rss':>10}"
        f" {'peak rss':>10} {cpu_head:>8}  {last}"
    ]
    for row in rows:
        cpu = f"{row.cpu_time:.2f}s" if final else f"{row.cpu_percent:.0f}%"
        extra = row.detail if final else ", ".join(f"{n} pid {p}" for p, n, _ in row.subtasks)
        lines.append(
            f"{row.description:<{width}}  {row.pid:>7}  {row.state:<10} {row.restarts:>8}"
            f" {row.uptime(now):>6.1f}s"
            f" {mib(row.rss):>10} {mib(row.peak_rss):>10} {cpu:>8}  {extra}"
        )
    return lines


class PlainView(View):
    """Timestamped plain lines: for pipes, logs, and terminals without rich."""

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Write ``[  1.23s] kind  text``, then the record's fields indented, if any."""
        self._write(f"[{self.now():6.2f}s] {kind:<10} {text}")
        for key, value in (fields.get("record") or {}).items():
            for number, line in enumerate(str(value).rstrip().splitlines()):
                self._write(f"{'':>20}{key + ':' if number == 0 else '':<18}{line}")

    def _status(self, rows: list[Row], now: float) -> None:
        for line in table_lines(rows, now):
            self._write(f"[{now:6.2f}s] {'status':<10} {line}")

    def summary(self, rows: list[Row]) -> None:
        """Write the final table, unprefixed."""
        self._write("")
        for line in table_lines(rows, self.now(), final=True):
            self._write(line)
        self._write("")


def make_view(as_json: bool, stream: IO[str] | None = None) -> View:
    """The JSON view if asked, the rich live view on a terminal with rich, else the plain view."""
    out = sys.stdout if stream is None else stream
    if as_json:
        return JsonView(out)
    if out.isatty():
        try:
            from procsup.demo.rich_view import RichView
        except ImportError:  # the demo extra is not installed: degrade to plain lines
            return PlainView(out)
        return RichView(out)
    return PlainView(out)
