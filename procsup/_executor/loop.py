"""The executor thread's wait: epoll on its pipes, events from other threads, deadlines.

::

    any thread                                 the executor's thread
    ──────────                                 ─────────────────────
    post(event) ─▶ events.append ─┐            turn(has_work):
    wake() ──────────────────────┴▶ a byte      asleep = True; then look: events, or has_work()?
       on the wake-up pipe, only if the           yes: epoll.poll(0)   no: epoll.poll(deadline)
       thread is asleep (once per sleep)        asleep = False
                                                each ready fd: its callback (watch(fd, callback))
    timers.call_later(delay, fn) ─▶ heap        each event, in order
                                                each timer that is due

Things that don't work
----------------------
- A wake-up byte per post: the write releases the GIL, and a loop of submits would hand the GIL
  to this thread and back, item after item. A byte is written only while the thread sleeps.
  The thread says it sleeps *before* it looks for work, so a poster either sees it asleep (and
  writes) or posted before the thread looked (and is seen): no wake-up is lost.
- Draining the wake-up pipe until EAGAIN: a second read per wake-up that only says EAGAIN. One
  read of up to 4 KiB takes every byte there can be (one per sleep).
- Writing the byte after the pipe is closed: its number may be another file's by then. The
  write and the close hold one lock.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
from collections.abc import Callable

from procsup._supervision.timers import Timers

__all__ = ["Loop"]


class Loop:
    """One thread's wait (see the module docstring).

    Invariants: ``_callbacks`` maps every fd registered with ``_epoll`` to what its readiness
    calls (entries go in before the fd is registered and out after it is unregistered, both on
    the thread); ``_asleep`` is True from just before the thread looks for work until its poll
    returns; ``_woken`` is True once a byte was written for the current sleep; after
    ``close()``, ``_wake_w`` is -1 and nothing is written.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._events: collections.deque[Callable[[], object]] = collections.deque()
        self._asleep = False
        self._woken = False
        self._wake_lock = threading.Lock()
        self.timers = Timers(self.wake)
        self.watch(self._wake_r, self._drain)

    def watch(self, fd: int, callback: Callable[[], object], mask: int = select.EPOLLIN) -> None:
        """On the thread: call ``callback`` whenever ``fd`` is ready (level-triggered)."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, mask)

    def unwatch(self, fd: int) -> None:
        """On the thread: stop watching ``fd`` (before it is closed); idempotent."""
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._callbacks

    def post(self, event: Callable[[], object]) -> None:
        """From any thread: have the thread run ``event`` soon, after those posted before it."""
        self._events.append(event)
        self.wake()

    def wake(self) -> None:
        """From any thread: end the thread's sleep, if it sleeps."""
        if not self._asleep or self._woken:
            return
        self._woken = True
        with self._wake_lock, contextlib.suppress(BlockingIOError):  # full: it wakes anyway
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def turn(self, has_work: Callable[[], bool]) -> None:
        """On the thread: sleep until an fd, an event or a deadline needs it (not at all if
        ``has_work()``), then run what is ready: fd callbacks, events, due timers."""
        self._asleep = True  # first: see the module docstring
        if self._events or has_work():
            ready = self._epoll.poll(0)
        else:
            ready = self._epoll.poll(self.timers.timeout())
        self._asleep = self._woken = False
        for fd, _ in ready:
            callback = self._callbacks.get(fd)  # an earlier callback may have unwatched it
            if callback is not None:
                callback()
        while self._events:
            self._events.popleft()()
        self.timers.run_due()

    def close(self) -> None:
        """On the thread, once it is done: unwatch everything, close the fds (idempotent)."""
        with self._wake_lock:
            if self._wake_w < 0:
                return
            for fd in list(self._callbacks):
                self.unwatch(fd)
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
