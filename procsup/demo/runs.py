"""Each run of the demo's tasks as ``Supervisor.events()`` tells it: failures, restarts, escalation.

::

    supervision thread ── TaskEvent ──▶ EventStream ─┬─ RunLog.follow() (a loop task) ──┬─▶ _tell()
                                                     └─ RunLog.drain() (before outcomes) ┘
    _tell(): "failed"/"crashed" of a run ──▶ a failed/crashed event (the crash record if the task
                                             is temporary: that failure cancels its parent)
             "restarted" ──────────────────▶ new pid, restart count, backoff, handle.last_failure
             "escalated" ──────────────────▶ the intensity exceeded, each failed run in a record

Only this module reads the stream; ``procsup.demo.runner`` tells the final outcomes (``join_async``
carries the value a task returns; events do not), after ``drain()``, so that an outcome is never
told before the runs that led to it. ``told()`` says whether an error was already told here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from procsup import (
    CriticalTaskError,
    CriticalTaskExecutionHandle,
    EventStream,
    TaskCrashedError,
    TaskEvent,
    TaskPanickedError,
)
from procsup.demo.rows import Row, mib
from procsup.demo.spec import Spec
from procsup.demo.view import View

__all__ = ["RunLog", "classify", "record", "short"]

# Shown by record() itself, or not worth a line of their own.
_COVERED = {"description", "pid", "exitcode", "signal", "stopped", "remote_traceback"}
_COVERED |= {"peak_rss", "wall_time", "cpu_time"}


def short(error: BaseException) -> str:
    """An outcome without its "Critical task '<d>' failed: " prefix, first line only."""
    text = str(error)
    return text.split(": ", 1)[-1].splitlines()[0] if text else repr(error)


def classify(exc: CriticalTaskError) -> str:
    """The demo's event name for an outcome."""
    if isinstance(exc, TaskCrashedError):
        return "stopped" if exc.stopped else "crashed"
    if isinstance(exc, TaskPanickedError):
        return "panicked"
    return "lost" if type(exc) is CriticalTaskError else "failed"


def record(exc: CriticalTaskError, row: Row, now: float) -> dict[str, Any]:
    """The record of a failure: the error's own figures where it has them, else the last sample."""
    fields: dict[str, Any] = {"task": row.description, "pid": exc.pid, "exit code": exc.exitcode}
    if isinstance(exc, TaskCrashedError):
        fields["signal"] = exc.signal or "none (exited)"
    wall, cpu, peak = (getattr(exc, key, None) for key in ("wall_time", "cpu_time", "peak_rss"))
    fields["wall time"] = f"{row.uptime(now) if wall is None else wall:.2f} s"
    fields["cpu time"] = f"{row.cpu_time:.2f} s (sampled)" if cpu is None else f"{cpu:.2f} s"
    fields["peak RSS"] = f"{mib(row.peak_rss)} (VmHWM, sampled)" if peak is None else mib(peak)
    shown = {str(value) for value in fields.values()}
    for key, value in vars(exc).items():  # a richer crash record, shown as it grows
        text = str(value).rstrip()
        if key in _COVERED or key.startswith("_") or value is None or text in shown:
            continue
        shown.add(text)
        fields[key.replace("_", " ")] = text
    traceback = getattr(exc, "remote_traceback", None)
    if traceback:
        fields["child traceback"] = traceback
    return fields


class RunLog:
    """Tells each run of the demo's tasks from the supervisor's event stream, on the loop thread.

    Invariants: ``failed_runs[d]`` lists task ``d``'s failed runs in order; every error in it has
    been told; ``escalated[d]`` is the cause of ``d``'s escalation, once told.
    """

    def __init__(
        self,
        view: View,
        rows: dict[str, Row],
        specs: dict[str, Spec],
        handles: dict[str, CriticalTaskExecutionHandle[Any]],
        on_restart: Callable[[str], None] = lambda description: None,
    ) -> None:
        self.view = view
        self.on_restart = on_restart  # called with the description once a restart is told
        self.rows, self.specs, self.handles = rows, specs, handles
        self.stream: EventStream | None = None  # set, from Supervisor.events(), before spawns
        self.failed_runs: dict[str, list[CriticalTaskError]] = {}
        self.escalated: dict[str, str] = {}
        self._failed_at: dict[str, float] = {}  # task -> TaskEvent.time of its last failed run

    def told(self, error: BaseException) -> bool:
        """True if ``error`` was told as a run's failure."""
        return any(error is told for runs in self.failed_runs.values() for told in runs)

    async def follow(self) -> None:
        """Tell events as they come, until ``stream`` is closed (None: there is nothing to tell)."""
        stream = self.stream
        with contextlib.suppress(EOFError):
            while stream is not None:
                self._tell(await stream.get_async())
                self.drain()

    def drain(self) -> None:
        """Tell every event received so far (before an outcome: what led to it comes first)."""
        while self.stream is not None:
            try:
                event = self.stream.get(0)
            except (TimeoutError, EOFError):
                return
            self._tell(event)

    def _tell(self, event: TaskEvent) -> None:
        row = self.rows.get(event.description)
        if row is None:  # "started" of a spawn still under way: the runner tells it
            return
        if event.kind in ("failed", "crashed") and event.error is not None:
            self._failed_at[row.description] = event.time
            self._run_failed(row, event.error, event.restarts + 1)
        elif event.kind == "restarted" and event.pid is not None:
            self._restarted(row, event, event.pid)
        elif event.kind == "escalated":
            self._escalated(row, event)
        else:
            return
        self.view.refresh(list(self.rows.values()))

    def _run_failed(self, row: Row, error: CriticalTaskError, run: int) -> None:
        self.failed_runs.setdefault(row.description, []).append(error)
        spec, kind = self.specs[row.description], classify(error)
        fields: dict[str, Any] = {
            "task": row.description,
            "pid": error.pid,
            "exitcode": error.exitcode,
            "signal": getattr(error, "signal", None),
            "run": run,
            "restart": spec.restart,
        }
        if spec.restart == "temporary":  # its only run: this failure cancels the parent
            details = record(error, row, self.view.now())
            self.view.event(kind, str(error), **fields, record=details)
            return
        # One run of a restartable task: one line; its restart or escalation tells the rest.
        row.state, row.detail = "restarting", short(error)
        self.view.event(kind, f"{str(error).splitlines()[0]} (run {run})", **fields)

    def _restarted(self, row: Row, event: TaskEvent, pid: int) -> None:
        spec, handle = self.specs[row.description], self.handles[row.description]
        row.pid, row.restarts, row.state = pid, event.restarts, "running"
        row.cpu_before = row.cpu_time
        opts = spec.options
        text = (
            f"{row.description} (pid {pid}): restart {event.restarts} of at most "
            f"{opts['max_restarts']} within {opts['period']:g} s"
        )
        fields: dict[str, Any] = {"task": row.description, "pid": pid, "restarts": event.restarts}
        failed_at = self._failed_at.get(row.description)
        if failed_at is not None:
            backoff = max(0.0, event.time - failed_at)
            text += f", {backoff:.2f} s after the failure (backoff)"
            fields["backoff"] = round(backoff, 3)
        last = handle.last_failure
        if last is not None:
            text += f"; last failure: {short(last)}"
        fields["last_failure"] = None if last is None else str(last)
        self.view.event("restarted", text, **fields)
        self.on_restart(row.description)

    def _escalated(self, row: Row, event: TaskEvent) -> None:
        self.escalated[row.description] = event.detail
        row.state = "escalated"
        details: dict[str, Any] = {
            "task": row.description,
            "policy": self.specs[row.description].policy(),
            "restarts": event.restarts,
        }
        for run, error in enumerate(self.failed_runs.get(row.description, []), 1):
            pid = f"(pid {error.pid})"
            details[f"run {run}"] = short(error) + ("" if pid in str(error) else f" {pid}")
        # The cause lists the failures again: the line says what happened, the record each run.
        self.view.event(
            "escalated",
            event.detail.split("; last failures:")[0],
            task=row.description,
            pid=event.pid,
            restarts=event.restarts,
            cause=event.detail,
            record=details,
        )
