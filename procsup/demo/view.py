"""How the demo tells its story: the ``View`` interface, and the two views that need only stdlib.

::

    demo runner (event loop thread)
      ├─ view.status(rows) ──▶ PlainView: timestamped lines, one block per second
      │                        JsonView: a "status" object per second
      │                        RichView (procsup.demo.rich_view): a rich Live table redrawn in place
      ├─ view.refresh(rows) ─▶ a state changed: a live display redraws now
      ├─ view.event(kind, text, **fields) ──▶ a timestamped line / one JSON object / a styled line
      └─ view.summary(rows), view.close() ──▶ the final table; the live display stopped

Which one the demo uses is ``procsup.demo.output.make_view``'s choice.

Things that don't work
----------------------
- Printing from the tasks: they share the terminal, and under ``--json`` any stray line corrupts
  the stream; tasks report through their return value instead.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

from procsup.demo.rows import Row, mib

__all__ = ["JsonView", "PlainView", "View", "table_lines"]

_STATUS_EVERY = 1.0  # seconds between status blocks in the line-oriented views


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
        except OSError:
            # Nobody can read on: the reader left (``| head``, EPIPE), the disk is full
            # (``> /dev/full``, ENOSPC). The tasks still shut down properly, unseen. Point the
            # stream's fd at /dev/null, so that the next writes, and the interpreter's last flush
            # at exit, do not fail again.
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
