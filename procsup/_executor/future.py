"""An executor item's future: a ``concurrent.futures.Future`` whose ``cancel()`` also stops a
running item.

::

    state         PENDING ── claim() ──▶ RUNNING ── settle() ──▶ FINISHED
    (CF's names)     │    ◀── unclaim() ──  │ (its worker died before it started the item)
                     │ cancel()             │ cancel()
                     ▼                      ▼
                  CANCELLED: on_cancel(), in the cancelling thread: an item in a worker's pipe
                  has its token cancelled (it is then skipped there, never started), the rest
                  is the executor's: dropped from its queue, taken back, or, running, killed
                  after the grace period if it has not returned
                     ▼
                  CANCELLED_AND_NOTIFIED, before cancel() returns: wait() and as_completed()
                  see it done at once; whatever the item sends is dropped

Things that don't work
----------------------
- CF's ``cancel()``: it refuses a RUNNING future, and leaves a pending one CANCELLED until its
  executor calls ``set_running_or_notify_cancel()``, so ``wait()`` and ``as_completed()`` do not
  see it done until the executor reaches it in its queue (CF's ProcessPoolExecutor only when it
  moves the item to its call queue). Here a cancelled future is done, for every waiter, at once.
- Telling waiters first: a thread woken by wait() could act on the cancel while the item was
  still free to start. They learn of it once the item's token is cancelled.
- Settling a future from the executor's thread with ``set_result()`` after checking its state: a
  user's ``cancel()`` can come between the two. ``settle()`` tries and reports which one won.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

__all__ = ["ItemFuture"]

T = TypeVar("T")


class ItemFuture(concurrent.futures.Future[T]):
    """The future of one ``procsup.Executor`` item.

    ``cancel()`` works on a pending item as in ``concurrent.futures``, and on a running one too:
    the item's token is cancelled, its worker is killed if it has not returned after the
    executor's ``grace_period``, and the future is cancelled at once (``cancelled()`` is True,
    ``result()`` raises ``CancelledError``). It returns False only once the future has a result.
    """

    def __init__(self, on_cancel: Callable[[], None]) -> None:
        super().__init__()
        # Dropped once the future is done: the executor's item refers to the future, and this
        # to the item, a cycle only the cyclic GC would free (results kept until a full pass).
        self._on_cancel: Callable[[], None] | None = on_cancel

    def cancel(self) -> bool:
        """Cancel the item, running or not; False if it has finished already."""
        return self._cancel(pending_only=False)

    def cancel_pending(self) -> bool:
        """Cancel it only if it has not started (``shutdown(cancel_futures=True)``, as CF's)."""
        return self._cancel(pending_only=True)

    def _cancel(self, pending_only: bool) -> bool:
        with self._condition:
            if self._state == FINISHED or (pending_only and self._state != PENDING):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED  # not done for wait() yet: the item is stopped first
            on_cancel, self._on_cancel = self._on_cancel, None
        if on_cancel is not None:
            on_cancel()
        with self._condition:
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def pending(self) -> bool:
        """For the executor: whether it is still PENDING (not claimed, not cancelled)."""
        return self._state == PENDING

    def claim(self) -> bool:
        """For the executor: PENDING becomes RUNNING (True); False if it was cancelled."""
        with self._condition:
            if self._state != PENDING:
                return False
            self._state = RUNNING
            return True

    def unclaim(self) -> bool:
        """For the executor: RUNNING goes back to PENDING (its worker died before it read the
        item); False if it was cancelled meanwhile."""
        with self._condition:
            if self._state != RUNNING:
                return False
            self._state = PENDING
            return True

    def settle(self, value: Any = None, error: BaseException | None = None) -> bool:
        """For the executor: publish the outcome; False (and nothing done) if it was cancelled."""
        self._on_cancel = None
        try:
            if error is None:
                self.set_result(value)
            else:
                self.set_exception(error)
        except concurrent.futures.InvalidStateError:
            return False
        return True
