"""Live status of a supervisor's tasks: snapshots on demand, and a stream of lifecycle events.

::

    caller's thread (first start)  ─┐
    supervision thread (outcomes,   ├─▶ StatusHub.emit(TaskEvent) ─┬─▶ EventStream (deque, bounded)
      restarts, escalations)       ─┘                              │     get() / for / async for
                                                                   └─▶ callbacks (on that thread)
    Supervisor.tasks() ─▶ every live Lifecycle.snapshot() ─▶ [TaskSnapshot] (psutil: RSS, CPU%)

Every run of a task produces ``started`` (or ``restarted``), then exactly one of ``finished``,
``cancelled``, ``failed`` or ``crashed``; a restarting task adds ``restarted`` per new run, and
``escalated`` when it exceeded its restart intensity and cancelled its parent.

Things that don't work
----------------------
- An unbounded queue per subscriber: a consumer that stops reading would grow the supervisor
  without limit. Streams keep the newest ``maxlen`` events and count what they dropped.
- Calling subscribers under the hub's lock: a callback that spawns or cancels would deadlock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from procsup._os.timeouts import check_timeout
from procsup._outcome.errors import CriticalTaskError

if TYPE_CHECKING:  # asyncio is imported when first used: see procsup._supervision.aio
    import asyncio

__all__ = [
    "EventKind",
    "EventStream",
    "Live",
    "StatusHub",
    "TaskEvent",
    "TaskSnapshot",
    "TaskState",
]

logger = logging.getLogger("procsup")

EventKind = Literal[
    "started", "cancelled", "finished", "failed", "crashed", "restarted", "escalated"
]
TaskState = Literal["running", "cancelling", "stopping", "restarting"]


@dataclass(frozen=True)
class TaskEvent:
    """One lifecycle event of a critical task.

    Attributes:
        kind: "started" (a process started), "restarted" (a new run after the previous one ended;
            ``pid`` is the new process), "finished" (returned), "cancelled" (returned after its
            token was cancelled, or was stopped on request), "failed" (raised), "crashed" (died
            without reporting, including a timeout kill), "escalated" (restart intensity exceeded:
            the parent token was cancelled and the task will not run again).
        description: The task's description.
        pid: The process the event is about (None for "escalated" after no process started).
        restarts: How many times the task had been restarted when the event happened.
        time: ``time.time()`` when the event was emitted.
        error: The run's error for "failed"/"crashed"/"cancelled" by a stop, else None.
        detail: A human-readable line (the error, the restart delay, the escalation cause).
    """

    kind: EventKind
    description: str
    pid: int | None
    restarts: int
    time: float
    error: CriticalTaskError | None = None
    detail: str = ""


@dataclass(frozen=True)
class TaskSnapshot:
    """The state of one critical task at the time ``Supervisor.tasks()`` was called.

    Attributes:
        description: The task's description.
        pid: Its current process, or None while it waits to be restarted.
        state: "running"; "cancelling" (its token is cancelled, it has not exited yet); "stopping"
            (procsup is signalling it: a stop, a shutdown or a timeout); "restarting" (between two
            runs, waiting out the backoff).
        uptime: Seconds since the current run's process started (0.0 while restarting).
        restarts: How many times it has been restarted.
        rss: Resident memory of the current process in bytes, or None if unknown.
        cpu_percent: CPU use of the current process since the previous ``tasks()`` call (since its
            start on the first call), in percent of one core, or None if unknown.
    """

    description: str
    pid: int | None
    state: TaskState
    uptime: float
    restarts: int
    rss: int | None
    cpu_percent: float | None


# Pickles and reprs name the public path, which does not move with the private modules.
TaskEvent.__module__ = TaskSnapshot.__module__ = "procsup"


class EventStream:
    """Lifecycle events of one supervisor's tasks, from the moment the stream was opened.

    Iterate it (blocking), ``async for`` it, or call ``get(timeout)``. Keeps at most ``maxlen``
    unread events (the oldest are dropped and counted in ``dropped``). ``close()`` (or leaving a
    ``with`` block) ends iteration once the events already received are read.
    """

    __module__ = "procsup"

    def __init__(self, hub: StatusHub, maxlen: int) -> None:
        self._hub = hub
        self._events: collections.deque[TaskEvent] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition(threading.Lock())
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._closed = False
        self.dropped = 0

    def put(self, event: TaskEvent) -> None:
        """Deliver one event (called by the hub)."""
        with self._cond:
            if self._closed:
                return
            if len(self._events) == self._events.maxlen:
                self.dropped += 1
            self._events.append(event)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody awaits
                loop.call_soon_threadsafe(_wake, future)

    def get(self, timeout: float | None = None) -> TaskEvent:
        """Return the next event, waiting up to ``timeout`` seconds (None or ``math.inf``:
        forever; 0: no wait).

        Raises:
            TimeoutError: No event came in time.
            EOFError: The stream is closed and every event was read.
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number.
        """
        wait = check_timeout(timeout)
        deadline = None if wait is None else time.monotonic() + wait
        with self._cond:
            while not self._events:
                if self._closed:
                    raise EOFError("this event stream is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no task event within {timeout} s")
                self._cond.wait(remaining)
            return self._events.popleft()

    async def get_async(self) -> TaskEvent:
        """Asyncio form of ``get()`` with no timeout (wrap it in ``asyncio.wait_for``)."""
        import asyncio  # not at module level: see procsup._supervision.aio

        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._events:
                    return self._events.popleft()
                if self._closed:
                    raise EOFError("this event stream is closed")
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def close(self) -> None:
        """Stop receiving events; iteration ends after the ones already received. Idempotent."""
        self._hub.unsubscribe(self)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    def __iter__(self) -> Iterator[TaskEvent]:
        return self

    def __next__(self) -> TaskEvent:
        try:
            return self.get()
        except EOFError:
            raise StopIteration from None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TaskEvent:
        try:
            return await self.get_async()
        except EOFError:
            raise StopAsyncIteration from None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Live(Protocol):
    """A task the hub lists until its final outcome (``procsup._supervision.lifecycle``)."""

    def snapshot(self) -> TaskSnapshot: ...


class StatusHub:
    """A supervisor's registry of live tasks and its event subscribers.

    Invariants (under ``_lock``): ``lives`` holds, in start order, every task whose final outcome
    is not published yet (running or between runs); ``_streams`` and ``_callbacks`` every
    subscriber not yet removed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lives: dict[Live, None] = {}  # an insertion-ordered set
        self._streams: list[EventStream] = []
        self._callbacks: list[Callable[[TaskEvent], object]] = []

    def register(self, life: Live) -> None:
        with self._lock:
            self.lives[life] = None

    def forget(self, life: Live) -> None:
        with self._lock:
            self.lives.pop(life, None)

    def live(self) -> list[Live]:
        with self._lock:
            return list(self.lives)

    def stream(self, maxlen: int) -> EventStream:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ValueError(f"maxlen must be an int >= 1, got {maxlen!r}")
        stream = EventStream(self, maxlen)
        with self._lock:
            self._streams.append(stream)
        return stream

    def add_callback(self, callback: Callable[[TaskEvent], object]) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    def unsubscribe(self, stream: EventStream) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._streams.remove(stream)

    def emit(self, event: TaskEvent) -> None:
        with self._lock:
            if not self._streams and not self._callbacks:
                return
            streams, callbacks = list(self._streams), list(self._callbacks)
        for stream in streams:
            stream.put(event)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a subscriber's bug must not break supervision
                logger.exception("procsup: an event callback raised on %s", event.kind)
