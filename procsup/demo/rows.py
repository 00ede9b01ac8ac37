"""What the demo knows of each task: one ``Row`` across its runs, kept fresh by the ``Sampler``.

::

    demo runner (event loop thread)
      └─ Sampler.sample(rows, sup.tasks()) every 0.25 s ── state, pid (across restarts), restarts,
             RSS, CPU% from the snapshots; psutil adds what they lack: CPU time, peak RSS (VmHWM),
             descendants (a nested task's sub-task)

The runner and the event log change a row's state and detail as outcomes are told; the views
(``procsup.demo.view``, ``procsup.demo.rich_view``) only read rows.

Things that don't work
----------------------
- RSS as the peak (``TaskSnapshot.rss`` or psutil's): a sampled RSS misses a spike between samples;
  the kernel's high-water mark (``VmHWM`` in ``/proc/<pid>/status``) does not.
- ``Supervisor.tasks()`` alone: a task whose outcome is published leaves it, so a row keeps its
  last sample; and it has no CPU time, peak RSS or descendants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psutil

from procsup import TaskSnapshot

__all__ = ["Row", "Sampler", "mib"]


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
