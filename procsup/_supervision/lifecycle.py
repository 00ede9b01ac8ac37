"""A critical task across its runs: Erlang/OTP restart policies, backoff, intensity, timeouts.

::

    spawn() ─▶ Lifecycle.start() ─▶ backend.start(RunSpec) ─▶ run 1 (a Run, fresh child token)
                                                              │ outcome published (monitor thread)
                                  Lifecycle._ended() ◀────────┘ event: finished, cancelled, ...
                                    temporary, or stopped, cancelled, shut down ─▶ final outcome
                                    transient + returned                        ─▶ final outcome
                                    more than max_restarts within period        ─▶ cancel parent
                                                                                   ("escalated")
                                    else: backend.call_later(backoff) ─▶ _restart() ─▶ run 2 ...
                                          + a watch of the parent ─▶ cancelled during the
                                            backoff: _parent_cancelled() ─▶ final outcome, at once
    handle.join() ◀── Lifecycle.future: set once, with the final outcome only

Policies (OTP ``restart`` values): ``temporary`` runs once, and a failure cancels the parent (the
seed's behaviour); ``transient`` is restarted after a failure or crash, not after a return;
``permanent`` is restarted after any end. A task stops being restarted once its handle cancels or
stops it, its parent token is cancelled or its supervisor shuts down: its last outcome is then
final. A restartable task's failures do not cancel its parent; exceeding the restart intensity does,
with a cause that lists the last failures, and so does a final failure.

Backoff before restart ``n`` within the current period is ``min(first * 2**(n-1), most)``, scaled
by a random factor in [0.5, 1] (jitter) so tasks that failed together do not restart in lockstep.

Things that don't work
----------------------
- Restarting from the thread that joins: a detached task has nobody joining, and must restart (or
  escalate) all the same. Decisions are made in the outcome's done-callback, on the supervision
  thread, and the restart is a timer on that thread's heap (``procsup._supervision.timers``): no
  sleep there.
- Looking at the parent only when the backoff's timer fires (as ``_restart()`` once did alone): a
  parent cancelled during a 20 s backoff left ``join()`` waiting, and ``tasks()`` saying
  "restarting", for the rest of it. While a task waits out its backoff, its parent is watched
  (``procsup._token.watch``: the process's ``awaiting()`` watch, whose thread sleeps on the
  token's futex word and exists only while something is watched); its cancellation ends the wait
  and publishes the last outcome from the watch's thread, as ``cancel()`` does from its caller's
  (``_publish()`` runs once, whichever thread gets there first). Polling ``is_cancelled()`` on
  the timers instead would trade latency for wake-ups.
- Reusing the first run's token: a cancelled token stays cancelled. Each run gets
  ``parent.child_token()``, made here (``_spec()``) like the first.
- Waiting for a timed-out run's end on the supervision thread: that thread publishes it. A
  timeout starts the backend's ladder (``backend.stop(failure=True)``), which steps on timers.

Everything this module knows of processes is the runtime protocol
(``procsup._supervision.runtime``): the same code supervises local processes and processes on
the nodes of a Ray cluster (``procsup._ray``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from procsup._os.tree import Ladder
from procsup._outcome.errors import CriticalTaskError, TaskCrashedError
from procsup._supervision.options import TaskOptions
from procsup._supervision.runtime import Backend, Run, RunSpec
from procsup._supervision.status import EventKind, StatusHub, TaskEvent, TaskSnapshot, TaskState
from procsup._supervision.timers import Timer
from procsup._token.token import CancellationToken, lock_is_free
from procsup._token.watch import Watched, awaiting

__all__ = ["Lifecycle"]

logger = logging.getLogger("procsup")

_HISTORY = 5  # failures listed in an escalation's cause
_LOCK_RETRY = 0.01  # seconds between looks at a token arena lock that another process holds


class Lifecycle:
    """One critical task, from its first start to its final outcome, across restarts.

    Invariants (under ``lock``): ``record`` is the current (or last) run, None only before the
    first start; ``future`` is set once, with the final outcome, after the parent was cancelled if
    that outcome cancels it (for a temporary task it *is* the run's future); ``_stopping`` is True
    once no further run may start; ``_pending`` is the restart timer while between runs, else None;
    ``_watched`` is the watch of the parent while a backoff is waited out (set with ``_pending``
    in ``_ended()``, cancelled whenever that backoff ends, however it ends), else None;
    ``_published`` is True once ``future`` holds the final outcome (a restartable task's).
    """

    def __init__(
        self,
        backend: Backend,
        status: StatusHub,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        options: TaskOptions,
    ) -> None:
        self.backend = backend
        self.status = status
        self.task_fn = task_fn
        self.parent = parent
        self.description = description
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.lock = threading.Lock()
        self.record: Run | None = None
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self.restarts = 0
        self.last_failure: CriticalTaskError | None = None
        self._last: tuple[Any, BaseException | None] = (None, None)
        self._history: collections.deque[str] = collections.deque(maxlen=_HISTORY)
        self._restart_times: collections.deque[float] = collections.deque()
        self._stopping = False
        self._pending: Timer | None = None
        self._watched: Watched | None = None
        self._published = False
        self._deadline: Timer | None = None
        self._started = 0.0
        self._stop: tuple[str, str, float | None] | None = None  # stop()'s reasons and grace
        self.ladder: Ladder | None = None  # stopping the current run, once stop() was called

    # ---------------------------------------------------------------- runs

    def _spec(self) -> RunSpec:
        """The next run: its own token, a child of the parent (born cancelled if it has no time
        at all, as a wait of 0 polls)."""
        token = self.parent.child_token()
        if self.options.timeout == 0:
            token.cancel(f"Critical task '{self.description}' timed out after 0 s")
        return RunSpec(
            task_fn=self.task_fn,
            description=self.description,
            args=tuple(self.args),
            kwargs=dict(self.kwargs or {}),
            parent=self.parent,
            token=token,
            options=self.options,
            cancels_parent=not self.options.restarts,
        )

    def start(self) -> None:
        """Start the first run in the caller's thread; raises as ``Backend.start`` does."""
        record = self.backend.start(self._spec())
        if not self.options.restarts:
            self.future = record.future  # no second run: join() waits on the run itself
        self.status.register(self)
        self._began(record, "started")

    def _began(self, record: Run, kind: EventKind) -> None:
        with self.lock:
            self.record = record
            self._started = time.monotonic()
            stop = self._stop if self._stopping else None
            if self._stopping and stop is None:  # cancelled while this run was being started
                record.spec.token.cancel(f"Critical task '{self.description}' was cancelled")
        if stop is not None:  # stopped while this run was being started: stop it too
            self.ladder = self.backend.stop([record], stop[2], stop[0], stop[1])
        self._emit(kind, record.pid)
        if self.options.timeout is not None:
            self._deadline = self.backend.call_later(
                self.options.timeout, functools.partial(self._timed_out, record)
            )
        record.future.add_done_callback(functools.partial(self._ended, record))

    def _ended(self, record: Run, future: concurrent.futures.Future[Any]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        error = future.exception()
        value = None if error is not None else future.result()
        if error is not None and isinstance(error, CriticalTaskError) and not _stopped(error):
            self.last_failure = error
        self._last = (value, error)
        with self.lock:
            final = (
                not self.options.restarts
                or self._stopping
                or _stopped(error)
                or self.parent.is_cancelled()
                or self.backend.closed
                or (self.options.restart == "transient" and error is None)
            )
            if final and self.options.restarts:
                self._stopping = True
        if final:
            # Out of tasks() before the event: whoever sees a run's final event sees it gone.
            self._finished()
        self._emit(_classify(record, error), record.pid, error)
        if not self.options.restarts:
            return
        if final:
            self._publish()
            return
        if error is None:
            self._history.append(f"returned normally (pid {record.pid})")
        else:
            self._history.append((str(error).splitlines() or [""])[0][:300])
        now = time.monotonic()
        times = self._restart_times
        while times and times[0] <= now - self.options.period:
            times.popleft()
        if len(times) >= self.options.max_restarts:
            self._escalate()
            return
        times.append(now)
        first, most = self.options.backoff
        delay = min(first * 2 ** (len(times) - 1), most) * random.uniform(0.5, 1.0)
        logger.warning(
            "Restarting critical task '%s' in %.3f s (restart %d of %d within %g s)",
            self.description,
            delay,
            len(times),
            self.options.max_restarts,
            self.options.period,
        )
        with self.lock:
            if self._stopping:  # cancelled meanwhile
                final = True
            else:
                self._pending = self.backend.call_later(delay, self._restart)
                # Fires at once if the parent is cancelled already (since the look above).
                self._watched = awaiting().watch(self.parent, self._parent_cancelled)
        if final:
            self._publish()

    def _parent_cancelled(self, cause: str) -> None:
        """On the watch's thread: the parent was cancelled during the backoff. No run will follow
        (it would be born cancelled), so the last outcome is final now, not when the timer fires."""
        with self.lock:
            pending, watched = self._end_backoff()
            if pending is None:  # the backoff ended meanwhile: _restart() or cancel() decides
                return
            self._stopping = True
        pending.cancel()
        if watched is not None:
            watched.cancel()
        self._publish()

    def _end_backoff(self) -> tuple[Timer | None, Watched | None]:
        """Under ``lock``: no backoff any more; return its timer and watch, to be cancelled."""
        pending, self._pending = self._pending, None
        watched, self._watched = self._watched, None
        return pending, watched

    def _restart(self) -> None:
        """On the supervision thread, once the backoff has passed (or at once if it is leaving)."""
        with self.lock:
            _, watched = self._end_backoff()
            # The parent may have been cancelled during the backoff: a run would be born cancelled.
            stop = self._stopping or self.backend.closed or self.parent.is_cancelled()
            if stop:
                self._stopping = True
        if watched is not None:
            watched.cancel()
        if stop:
            self._publish()
            return
        if not lock_is_free(self.parent):
            # Another process holds the token arena's lock, maybe stopped (SIGSTOP, a debugger):
            # the start would wait for it here, and no other task's death would be noticed
            # meanwhile. Look again shortly instead.
            with self.lock:
                if not self._stopping:
                    self._pending = self.backend.call_later(_LOCK_RETRY, self._restart)
                    return
            self._publish()
            return
        try:
            record = self.backend.start(self._spec())
        except Exception as exc:  # shut down meanwhile, or the start failed (logged)
            with self.lock:
                self._stopping = True
            if not self.backend.closed:
                error = CriticalTaskError(
                    f"Critical task '{self.description}' could not be restarted: {exc}",
                    description=self.description,
                )
                error.__cause__ = exc
                self._last = (None, error)
                logger.error("%s", error, exc_info=exc)
            self._publish()
            return
        self.restarts += 1
        self._began(record, "restarted")

    def _escalate(self) -> None:
        opts = self.options
        failures = "; ".join(f"[{i}] {text}" for i, text in enumerate(self._history, 1))
        cause = (
            f"Critical task '{self.description}' exceeded its restart intensity (more than "
            f"{opts.max_restarts} restarts within {opts.period:g} s) and will not be restarted; "
            f"last failures: {failures}"
        )
        with self.lock:
            self._stopping = True
        value, error = self._last
        if error is None:
            error = CriticalTaskError(cause, description=self.description, pid=self.pid)
        else:
            error.add_note(cause)
        self._last = (value, error)
        logger.error("%s", cause)
        self.parent.cancel(cause)
        self._emit("escalated", self.pid, detail=cause)
        self._publish(cancel_parent=False)

    def _publish(self, cancel_parent: bool = True) -> None:
        """Publish the last run's outcome as final; a failure cancels the parent first."""
        value, error = self._last
        with self.lock:  # once: the watch's thread and the supervision thread may both get here
            if self._published or self.future.done():
                return
            self._published = True
        if error is not None:
            if cancel_parent and isinstance(error, CriticalTaskError) and not _stopped(error):
                self.parent.cancel(str(error))
            self.future.set_exception(error)
        else:
            self.future.set_result(value)
        self._finished()

    def _finished(self) -> None:
        self.status.forget(self)

    # ---------------------------------------------------------------- from the handle

    def cancel(self, reason: str) -> None:
        """No further run; cancel the current token. Between runs, the last outcome is final."""
        with self.lock:
            self._stopping = True
            record = self.record
            pending, watched = self._end_backoff()
        if watched is not None:
            watched.cancel()
        if pending is not None:
            pending.cancel()
            self._publish()
        if record is not None:
            record.spec.token.cancel(reason)

    def stop(self, cancel_reason: str, stop_reason: str, grace: float | None) -> Ladder | None:
        """No further run; the current one goes down the backend's ladder: its token is
        cancelled, and after ``grace`` seconds (None: never) its tree is signalled, SIGTERM then
        SIGKILL, as stopped on request. A run that starts meanwhile is stopped the same way.
        Returns the current run's ladder (None before the first run)."""
        with self.lock:
            self._stopping = True
            self._stop = (cancel_reason, stop_reason, grace)
            record = self.record
            pending, watched = self._end_backoff()
        if watched is not None:
            watched.cancel()
        if pending is not None:
            pending.cancel()
            self._publish()
        if record is None:
            return None
        self.ladder = self.backend.stop([record], grace, cancel_reason, stop_reason)
        return self.ladder

    # ---------------------------------------------------------------- timeouts

    def _timed_out(self, record: Run) -> None:
        if record.future.done():
            return
        timeout, grace = self.options.timeout, self.backend.grace_period
        assert timeout is not None
        self.backend.stop(
            [record],
            grace,
            f"Critical task '{self.description}' timed out after {timeout:g} s",
            f"it exceeded its timeout of {timeout:g} s and did not honour cancellation "
            f"within {grace:g} s",
            failure=True,
        )

    # ---------------------------------------------------------------- status

    @property
    def pid(self) -> int | None:
        """The current (or last) run's pid."""
        record = self.record
        return None if record is None else record.pid

    def _emit(
        self,
        kind: EventKind,
        pid: int | None,
        error: BaseException | None = None,
        detail: str = "",
    ) -> None:
        err = error if isinstance(error, CriticalTaskError) else None
        if err is not None and not detail:
            detail = str(err).splitlines()[0]
        event = TaskEvent(kind, self.description, pid, self.restarts, time.time(), err, detail)
        self.status.emit(event)

    def snapshot(self) -> TaskSnapshot:
        """The task now, for ``Supervisor.tasks()``."""
        with self.lock:
            record, pending, started = self.record, self._pending, self._started
        if record is None or pending is not None or record.future.done():
            restarts = self.restarts
            return TaskSnapshot(self.description, None, "restarting", 0.0, restarts, None, None)
        state: TaskState = "running"
        if record.signalled:
            state = "stopping"
        elif record.spec.token.is_cancelled():
            state = "cancelling"
        facts = record.facts()
        uptime = time.monotonic() - started
        return TaskSnapshot(
            self.description, record.pid, state, uptime, self.restarts, facts.rss, facts.cpu_percent
        )


def _stopped(error: BaseException | None) -> bool:
    return isinstance(error, TaskCrashedError) and error.stopped


def _classify(record: Run, error: BaseException | None) -> EventKind:
    if error is None:
        return "cancelled" if record.spec.token.is_cancelled() else "finished"
    if isinstance(error, TaskCrashedError):
        return "cancelled" if error.stopped else "crashed"
    return "failed"
