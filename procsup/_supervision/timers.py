"""Deadlines for the supervision thread: restarts after a backoff, wall-clock timeouts.

::

    any thread                                   supervision thread (procsup._supervision.monitor)
    ──────────                                   ─────────────────────────────────────
    Timers.call_later(delay, fn) ─▶ heap push    epoll.poll(timeout=timers.timeout())
      earliest deadline changed? ─▶ wake-up byte   ─▶ timers.run_due(): pop and call what is due

The thread sleeps in ``epoll.poll`` until the next deadline or the next fd event, whichever comes
first: a pending restart costs nothing while it waits, and with no deadline the wait has no
timeout at all.

Things that don't work
----------------------
- ``threading.Timer`` per deadline: a thread per pending restart or per task with a timeout.
- ``time.sleep(backoff)`` on the supervision thread: every other task's death would go unnoticed for
  as long as the sleep lasts.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "Timers"]

logger = logging.getLogger("procsup")


class Timer:
    """One deadline; ``cancel()`` makes it a no-op (it leaves the heap when due)."""

    __slots__ = ("callback", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None] | None) -> None:
        self.deadline = deadline
        self.callback = callback

    def cancel(self) -> None:
        """Never call the callback (idempotent; harmless once it ran)."""
        self.callback = None


class Timers:
    """A heap of deadlines on ``time.monotonic()``.

    Invariants: ``_heap`` holds ``(deadline, seq, Timer)`` for every timer not yet run or dropped,
    under ``_lock``; callbacks run on the thread calling ``run_due``/``run_all``, never under it.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the supervision thread once ``delay`` seconds have passed."""
        timer = Timer(time.monotonic() + max(delay, 0.0), callback)
        with self._lock:
            heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
            first = self._heap[0][2] is timer
        if first:  # the thread may be sleeping until a later deadline, or with no timeout
            self._wake()
        return timer

    def timeout(self) -> float | None:
        """Seconds until the earliest deadline (0 if one is due), None if there is none."""
        with self._lock:
            while self._heap and self._heap[0][2].callback is None:
                heapq.heappop(self._heap)
            if not self._heap:
                return None
            return max(self._heap[0][0] - time.monotonic(), 0.0)

    def run_due(self) -> None:
        """Run every callback whose deadline has passed."""
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    return
                _, _, timer = heapq.heappop(self._heap)
            self._call(timer)

    def run_all(self) -> None:
        """Run every pending callback now (the thread is leaving: nothing may wait forever)."""
        with self._lock:
            pending, self._heap = [entry[2] for entry in sorted(self._heap)], []
        for timer in pending:
            self._call(timer)

    @staticmethod
    def _call(timer: Timer) -> None:
        callback, timer.callback = timer.callback, None
        if callback is None:
            return
        try:
            callback()
        except Exception:  # a broken deadline must not take supervision down with it
            logger.exception("procsup: a scheduled supervisor action failed")
