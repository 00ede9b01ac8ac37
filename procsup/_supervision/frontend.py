"""What every supervisor is in front of its backend: spawn, status, signals and shutdown.

::

    Supervisor (procsup._supervision.supervisor)       RaySupervisor (procsup.ray)
      LocalBackend                                        RayBackend
                  └──────────── Frontend(backend) ──────────┘
      spawn(): _spawn(options) ─▶ _launch ─▶ Lifecycle(backend) ─▶ the handle
      tasks(), events(), on_event(): the StatusHub        install_signal_handlers(): SignalBridge
      shutdown(): close the backend ─▶ cancel the root ─▶ the ladder for every live run, again
                  for runs whose start was under way ─▶ _finish(): join the backend (and more)
                  (on the backend's outcome thread: the ladders start there, and the rest runs
                  on a "procsup-shutdown" thread)

A subclass names itself (``_NAME``, in errors and the root's cancellation cause), declares its own
``spawn()`` (its options differ: a Ray run says where it may go) and calls ``_spawn()``, and fills
in the hooks: ``_launched()`` after a first run started, ``_shutting_down()`` once ``shutdown()``
has begun, ``_finish()`` to let the backend go.

Invariants (under ``_lock``): ``_closed`` is set once by ``shutdown()``; no task starts after it.
``_signals`` is the installed ``SignalBridge`` until ``shutdown()`` uninstalls it on the main
thread (on another, it only closes it: its handlers pass every signal on).

Things that don't work
----------------------
- Waiting in ``shutdown()`` when it is called on the backend's outcome thread (an ``on_event``
  callback: "shut down on the first crash"): the outcomes and the ladder's steps it waits for
  are that thread's to deliver, and it hung forever, and the interpreter's exit after it. There
  it starts what needs no waiting and leaves the waits to a thread of their own.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

from procsup._os.timeouts import check_timeout
from procsup._os.tree import REAP_DEADLINE, Ladder
from procsup._supervision.aio import off_loop
from procsup._supervision.handle import CriticalTaskExecutionHandle
from procsup._supervision.lifecycle import Lifecycle
from procsup._supervision.options import DEFAULT, TaskOptions, check_call
from procsup._supervision.runtime import Backend, Run
from procsup._supervision.signals import SignalBridge
from procsup._supervision.status import EventStream, StatusHub, TaskEvent, TaskSnapshot
from procsup._token.token import CancellationToken

__all__ = ["GRACE_PERIOD", "Frontend", "GracePeriod"]

logger = logging.getLogger("procsup")


class GracePeriod(enum.Enum):
    """``shutdown()``'s default timeout: the supervisor's ``grace_period``."""

    GRACE_PERIOD = "grace_period"

    def __repr__(self) -> str:
        return "GRACE_PERIOD"


GRACE_PERIOD = GracePeriod.GRACE_PERIOD


class Frontend:
    """The part of a supervisor in front of its ``Backend`` (see the module docstring)."""

    _NAME: ClassVar[str] = "Supervisor"
    _SIGNALS: ClassVar[tuple[int, ...]] = (signal.SIGINT, signal.SIGTERM)
    _DEFAULT_OPTIONS: ClassVar[TaskOptions] = DEFAULT  # a task made with the handle's constructor

    def __init__(self, backend: Backend, token: CancellationToken | None) -> None:
        self._backend = backend
        self.token = token if token is not None else CancellationToken()
        self._lock = threading.Lock()  # guards _closed and _signals
        self._closed = False  # set once by shutdown(); no task starts after
        self._signals: SignalBridge | None = None  # install_signal_handlers() until shutdown()
        self._status = StatusHub()  # live tasks (across restarts) and event subscribers

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` was called (or the backend was lost)."""
        return self._closed or self._backend.closed

    @property
    def grace_period(self) -> float:
        """Seconds ``shutdown()`` waits for tasks to honour cancellation."""
        return self._backend.grace_period

    def _spawn(
        self,
        task_fn: Callable[..., Any],
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        parent_token: CancellationToken | None,
        options: TaskOptions,
    ) -> CriticalTaskExecutionHandle[Any]:
        """``spawn()``'s body, once its options are checked."""
        parent = self.token if parent_token is None else parent_token
        return CriticalTaskExecutionHandle._adopt(
            self._launch(task_fn, parent, description, args, kwargs, options)
        )

    async def spawn_async(
        self, task_fn: Callable[..., Any], description: str, **spawn_args: Any
    ) -> CriticalTaskExecutionHandle[Any]:
        """``spawn()`` from a coroutine, without blocking the event loop.

        A start takes milliseconds (a supervisor's first, which boots its zygote or its agent on a
        node, much longer), so it runs in the loop's default executor. Takes the same arguments
        and raises the same errors as ``spawn()``. If the awaiting coroutine is cancelled
        meanwhile, the task is still started, then cancelled and detached.
        """
        spawn: Callable[..., CriticalTaskExecutionHandle[Any]] = getattr(self, "spawn")  # noqa: B009
        return await off_loop(functools.partial(spawn, task_fn, description, **spawn_args))

    def _launch(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        options: TaskOptions | None = None,
    ) -> Lifecycle:
        """Validate a task, then start its first run (``handle.Runtime``)."""
        check_call(task_fn, parent, description, args, kwargs)
        life = Lifecycle(
            self._backend, self._status, task_fn, parent, description, args, kwargs,
            options or self._DEFAULT_OPTIONS,
        )  # fmt: skip
        life.start()
        self._launched()
        return life

    def _launched(self) -> None:
        """A task's first run started."""

    def tasks(self) -> list[TaskSnapshot]:
        """Snapshots of every task not finally done (running, or waiting to restart), oldest
        first, with each process's RSS and CPU use (None for a process that just exited)."""
        return [life.snapshot() for life in self._status.live()]

    def events(self, maxlen: int = 10_000) -> EventStream:
        """Open a stream of lifecycle events of this supervisor's tasks (see ``TaskEvent``).

        Args:
            maxlen: Unread events kept; beyond it the oldest are dropped (``stream.dropped``).
        """
        return self._status.stream(maxlen)

    def on_event(self, callback: Callable[[TaskEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event; return a function removing it.

        The callback runs on the thread that caused the event: the supervision thread (a
        ``RaySupervisor``'s "procsup-ray" thread) for most, the starting thread for a first
        ``started`` (and for the outcome of a Ray task that came with its start's answer). Keep
        it short and non-blocking. What it raises is logged and dropped.
        """
        return self._status.add_callback(callback)

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM cancel this supervisor's root token; a second one shuts down.

        The first signal cancels ``token`` with a cause naming it ("Supervisor received SIGTERM
        (signal 15)"); the program is expected to notice and shut down. A second signal calls
        ``shutdown()`` with a grace of at most one second. The handlers never block: they write
        one byte to a pipe that a "procsup-signals" thread reads. A third signal, and every
        signal after ``shutdown()``, goes to the handler that was there before (by default,
        SIGINT raises ``KeyboardInterrupt`` again). ``shutdown()`` on the main thread restores the
        previous handlers where ours are still the current ones; on another thread it leaves
        them, passing every signal on, until the main thread calls ``shutdown()``. Idempotent.

        Raises:
            RuntimeError: not called from the main thread, or after ``shutdown()``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"this {self._NAME} has been shut down")
            if self._signals is None:
                self._signals = SignalBridge(self, self._SIGNALS)

    def shutdown(self, timeout: float | GracePeriod | None = GRACE_PERIOD) -> None:
        """Cancel the root token and every task, wait, escalate the stragglers (on their nodes,
        for a ``RaySupervisor``), then let go: reap everything and end the supervision thread,
        or let a ``RaySupervisor``'s agents and token hub go (and disconnect from Ray if it
        connected).

        Args:
            timeout: Seconds tasks get to honour cancellation before they are sent SIGTERM, then
                (one second later) SIGKILL. By default the supervisor's ``grace_period``; None
                (or ``math.inf``) waits for as long as they take; 0 escalates at once.

        Idempotent. Outcomes stay available on the handles. Tasks killed here raise
        ``TaskCrashedError`` (stopped on request) from ``join()`` and leave their parent alone.

        Called on the supervision thread (from an ``on_event`` callback, say "shut down on the
        first failure"), it cannot wait: that thread alone publishes outcomes and steps the
        escalation. It then returns at once, having done what needs no waiting: no task starts
        or is restarted any more, the root token is cancelled, and every live task is on its way
        down (its token cancelled, SIGTERM and SIGKILL scheduled after ``timeout``). A
        "procsup-shutdown" thread waits for them and lets go, as a call from another thread
        would; their outcomes are published once the callback has returned. A ``shutdown()``
        from another thread (``with``, interpreter exit) still waits for all of it.

        Raises:
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number; nothing is shut
                down then.
        """
        wait = self.grace_period if timeout is GRACE_PERIOD else check_timeout(timeout)
        if not self._owned():
            return
        with self._lock:
            self._closed = True
            signals = self._signals
        backend = self._backend
        backend.close()
        if signals is not None and signals.uninstall():
            self._signals = None
        self._shutting_down()
        cause = f"{self._NAME} shut down"
        self.token.cancel(cause)
        runs = backend.live()
        if not backend.on_outcome_thread():
            self._stop_all(runs, wait, cause, None)
            return
        # Every wait below needs this very thread: start the ladders here, wait on another.
        ladder = backend.stop(runs, wait, cause, _stop_reason(wait)) if runs else None
        threading.Thread(
            target=self._stop_all_later,
            args=(runs, wait, cause, ladder),
            name="procsup-shutdown",
            daemon=True,
        ).start()

    def _stop_all(
        self, runs: list[Run], wait: float | None, cause: str, ladder: Ladder | None
    ) -> None:
        """``shutdown()``'s waits: ``runs`` down their ladder (started already unless None),
        then any run whose start was under way, then ``_finish()``."""
        backend = self._backend
        while runs:  # again, for any task whose start was under way when we closed
            futures = [run.future for run in runs]
            if ladder is None:
                ladder = backend.stop(runs, wait, cause, _stop_reason(wait))
            pending: set[concurrent.futures.Future[Any]] = set(futures)
            while pending and not ladder.done.done():
                concurrent.futures.wait([*pending, ladder.done], return_when="FIRST_COMPLETED")
                pending = {future for future in pending if not future.done()}
            if pending and not ladder.done.result():  # all exited: their outcomes are on the way
                concurrent.futures.wait(pending, REAP_DEADLINE)
            runs = [run for run in backend.live() if run.future not in futures]
            ladder = None
        self._finish()

    def _stop_all_later(
        self, runs: list[Run], wait: float | None, cause: str, ladder: Ladder | None
    ) -> None:
        """The "procsup-shutdown" thread: ``_stop_all()``, with nobody to raise to."""
        try:
            self._stop_all(runs, wait, cause, ladder)
        except Exception:
            logger.exception("procsup: %s shutdown failed", self._NAME)

    def _owned(self) -> bool:
        """False in a process that is not this supervisor's own (a forked copy is inert)."""
        return True

    def _shutting_down(self) -> None:
        """``shutdown()`` has closed the backend: no task starts any more."""

    def _finish(self) -> None:
        """Every run has an outcome (or survived SIGKILL): let the backend go."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def _stop_reason(wait: float | None) -> str:
    return f"it did not honour cancellation within {wait} s of shutdown"
