"""The local backend: runs are this machine's processes, watched by one supervision thread.

::

    Supervisor ─ LocalBackend(LocalConfig): the runtime protocol (procsup._supervision.runtime)
                   start(spec): first start: preload, Monitor ─▶ launch()
                   stop(runs, grace, ...): Ladder (procsup._os.tree) ─ first step (the cancel) here,
                       the rest on the Monitor's timers: SIGTERM, freeze and SIGKILL, report
                   call_later(): the Monitor's timers (restarts, timeouts)
                   live(), close(), join(): the Monitor's live runs, its thread

Things that don't work
----------------------
- Escalating on the caller's thread (``stop()`` and ``shutdown()`` used to): a run's timeout
  fires on the supervision thread, which must never sleep, so it had a second, timer-driven copy
  of the ladder, and that one forgot to freeze the tree (a descendant that kept forking escaped
  it). One ladder, stepped on the supervision thread's timers, serves every caller.
- Waiting, in ``start()``, for a token arena lock held by a stopped process: restarts are put
  off by the lifecycle instead (``procsup._token.token.lock_is_free``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import psutil

from procsup._os import proc, tree
from procsup._os.tree import Ladder
from procsup._process.reduction import home_module
from procsup._process.zygote import import_modules
from procsup._process.zygote import preload as zygote_preload
from procsup._supervision.launch import LocalConfig, launch
from procsup._supervision.monitor import Monitor, TaskRecord
from procsup._supervision.runtime import Run, RunSpec
from procsup._supervision.timers import Timer

__all__ = ["OWN_PRELOAD", "LocalBackend", "LocalConfig"]

logger = logging.getLogger("procsup")

OWN_PRELOAD = ("procsup", "procsup._process.entry")  # imported by the zygote for every supervisor


class _Rung:
    """A local run as one rung of a ``Ladder``: its signals go under the record's lock, so they
    never reach a recycled pid, and say why (``stop_reason``, or ``limit_reason`` for a limit)."""

    def __init__(self, record: TaskRecord, cancel_reason: str, reason: str, failure: bool) -> None:
        self._record = record
        self._cancel_reason = cancel_reason
        self._reason = reason
        self._failure = failure

    def cancel(self) -> None:
        self._record.token.cancel(self._cancel_reason)

    def exited(self) -> bool:
        return self._record.exited

    def _mark(self) -> bool:
        """Under the lock: record why the run is signalled; False if it has exited."""
        record = self._record
        if record.exited:
            return False
        if self._failure:
            record.limit_reason = record.limit_reason or self._reason
        else:
            record.stop_reason = record.stop_reason or self._reason
        return True

    def terminate(self) -> None:
        with self._record.lock:
            if self._mark():
                proc.signal_tree(self._record.pid, signal.SIGTERM)

    def roots(self) -> list[psutil.Process]:
        with self._record.lock:
            if not self._mark():
                return []
            try:  # psutil keeps the start time: kill_trees never signals a recycled pid
                return [psutil.Process(self._record.pid)]
            except psutil.Error:
                return []

    def stuck(self) -> list[str]:
        record = self._record
        with record.lock:
            if record.exited:
                return []
            return [f"task '{record.description}' {line}" for line in tree.stuck([record.pid])]


class LocalBackend:
    """Runs on this machine (the runtime protocol); the Monitor thread starts with the first run.

    Invariants: ``_monitor`` is None until the first start, then the one Monitor for good;
    ``_closed`` is set once by ``close()``; a copy forked into another process is inert.
    """

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # guards _closed and _monitor
        self._closed = False
        self._monitor: Monitor | None = None
        self._pid = os.getpid()

    @property
    def grace_period(self) -> float:
        return self.config.grace

    @property
    def closed(self) -> bool:
        return self._closed or (self._monitor is not None and not self._monitor.alive)

    @property
    def booted(self) -> bool:
        """True once a first start has made the Monitor (whether or not it still runs)."""
        return self._monitor is not None

    def start(self, spec: RunSpec) -> TaskRecord:
        if os.getpid() != self._pid:
            raise RuntimeError("a Supervisor cannot be used in a process forked from its owner")
        with self._lock:
            if self._closed:
                raise RuntimeError("this Supervisor has been shut down")
            monitor = self._monitor
            if monitor is None:
                monitor = self._monitor = self._boot(home_module(spec.task_fn))
        return launch(self.config, monitor, spec)

    def _boot(self, task_module: str | None) -> Monitor:
        """Import the preload list where tasks are forked from, then make the Monitor.

        Raises:
            ImportError: a ``preload`` module raised when imported (a module that cannot be found
                was refused by the Supervisor's constructor); the message names it and its error.
        """
        preload = self.config.preload
        mine = preload[len(OWN_PRELOAD) :]
        if self.config.start_method == "fork":  # forked tasks find these imported
            failed = import_modules([*preload, task_module or "__main__"])
            for name, error in failed:
                if name not in mine:  # the task's own module: the task imports it, and fails there
                    logger.warning("procsup could not preload module %r: %s", name, error)
            failed = [(name, error) for name, error in failed if name in mine]
        else:  # the zygote imports its own
            failed = zygote_preload(mine) if mine else []
        if failed:
            name, error = failed[0]
            raise ImportError(
                f"Supervisor preload module {name!r} cannot be imported: {error}", name=name
            )
        return Monitor()

    def stop(
        self,
        runs: Sequence[Run],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        *,
        failure: bool = False,
    ) -> Ladder:
        records = [run for run in runs if isinstance(run, TaskRecord)]
        ladder = Ladder((_Rung(r, cancel_reason, stop_reason, failure) for r in records), grace)
        due = ladder.step()  # the cancel, here and now
        if due is not None:
            self._step_at(ladder, due)
        return ladder

    def _step_at(self, ladder: Ladder, due: float) -> None:
        def step() -> None:
            following = ladder.step()
            if following is not None:
                self._step_at(ladder, following)

        self.call_later(due - time.monotonic(), step)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        monitor = self._monitor
        assert monitor is not None, "a run has started, so the monitor exists"
        return monitor.timers.call_later(delay, callback)

    def live(self) -> list[Run]:
        monitor = self._monitor
        if monitor is None:
            return []
        with monitor.lock:
            runs: list[Run] = list(monitor.live)
        return runs

    def on_outcome_thread(self) -> bool:
        monitor = self._monitor
        return monitor is not None and monitor.on_thread()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def join(self, timeout: float) -> bool:
        monitor = self._monitor
        return monitor is None or monitor.close(timeout)

    def live_count(self) -> int:
        """How many runs are live (for ``repr``)."""
        monitor = self._monitor
        return 0 if monitor is None else len(monitor.live)
