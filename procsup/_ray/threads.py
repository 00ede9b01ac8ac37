"""The driver's two threads for one ``RaySupervisor``: Ray's answers, and deadlines.

::

    any thread ── call(fn) / submit(coro) ───▶ "procsup-ray" thread: an asyncio loop
    Ray's callback thread ─ call(fn) ────────▶   outcomes (publish, cancel the parent first),
    "procsup-ray-tokens" (a TokenWatch) ─────▶   token relays, the agents' and the hub's long
                                                 polls, stops and their deadlines
    any thread ── call_later(delay, fn) ─────▶ "procsup-ray-timers" thread: Timers
                                                 (procsup._supervision.timers): restarts after a
                                                 backoff, per-run timeouts

Things that don't work
----------------------
- Timers on the loop: a restart's ``start()`` waits for an agent's answer (a node away, or an
  agent being made: a second or more), and the loop must go on publishing other runs' outcomes
  meanwhile. Deadlines get a thread of their own, which may block.
- Doing work on Ray's callback thread (``ObjectRef.future()`` callbacks): it is Ray's own, and
  a callback that blocks there (a user's event callback, say) stalls every ``ray.get`` of the
  process. Callbacks only hand their result to the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from procsup._supervision.timers import Timer, Timers

__all__ = ["LoopThread", "TimerThread"]

T = TypeVar("T")

logger = logging.getLogger("procsup")


class LoopThread:
    """An asyncio event loop running in a daemon thread until ``close()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Whatever is still pending (a poll the hub never answered) is dropped quietly.
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    @property
    def current(self) -> bool:
        """True on the loop's own thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; a no-op once the loop is closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; its result as a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, timeout: float) -> bool:
        """Stop the loop (pending tasks are cancelled); True once the thread has ended."""
        if self.current:
            raise RuntimeError("the procsup-ray loop cannot close itself")
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class TimerThread:
    """``Timers`` driven by a thread of their own (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._closing = False
        self.timers = Timers(self._wake.set)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on this thread once ``delay`` seconds have passed."""
        return self.timers.call_later(delay, callback)

    @property
    def current(self) -> bool:
        """True on the timers' own thread."""
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        try:
            while not self._closing:
                # Cleared before the due timers run: a timer added meanwhile sets it again.
                self._wake.wait(self.timers.timeout())
                self._wake.clear()
                self.timers.run_due()
        except BaseException:
            logger.exception("procsup-ray-timers died; restarts and timeouts no longer happen")
        finally:
            self.timers.run_all()  # pending restarts resolve (the backend is closing: no restart)

    def close(self, timeout: float) -> bool:
        """Run what is pending now and end the thread; True once it has."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()
