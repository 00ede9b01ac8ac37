"""CancellationToken: a handle on one node of the shared cancellation tree.

The tree itself, its shared-memory layout and why it is kill-safe are in ``procsup._token.arena``.
Here: the public handle, its blocking and asyncio waits, and how it crosses into a child process
(pickled with the arena's fd while that process starts, and only then).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.context
import os
import sys
import time
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from procsup._os.timeouts import check_timeout
from procsup._token.arena import (
    CAUSE,
    DEFAULT_REASON,
    GEN,
    HINT,
    PATIENCE,
    PULL,
    SLOT_WORDS,
    Arena,
)
from procsup._token.futex import futex_wait
from procsup._token.watch import awaiting

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "CancellationToken",
    "DropGuard",
    "borrow_args",
    "borrow_node",
    "borrowed",
    "cancel_unstarted",
    "lock_is_free",
    "node",
    "prune",
    "renew",
    "waited_on",
]

T = TypeVar("T")

_PICKLE_HELP = (
    "a CancellationToken can cross into another process only as an argument of that process "
    "when it starts: pass it in Supervisor.spawn(..., args=...), CriticalTaskExecutionHandle("
    "..., args=...) or multiprocessing.Process(args=...), not through a Queue, a Pipe or pickle"
)


class CancellationToken:
    """A node of a cancellation tree shared by every process it is passed to.

    Semantics are those of ``tokio_util::sync::CancellationToken``: cancelling a token cancels its
    descendants, never its ancestors; a child of a cancelled token is born cancelled; dropping a
    token cancels nothing. Tokens compare and hash equal iff they are the same node, in whatever
    process they were unpickled.

    A token crosses into a child process as an argument given when the process starts (spawn and
    forkserver pickle it with the arena's fd; fork inherits it). Any other pickling raises
    ``TypeError`` saying so.

    No process dying at any instant, SIGKILL included, can make ``cancel()``, ``is_cancelled()``,
    ``wait()`` or ``cause`` block or fail in another process (see the module header).
    """

    __slots__ = ("__weakref__", "_arena", "_live", "_owner", "_slot", "_word", "_words")

    _arena: Arena
    _slot: int
    _live: int
    _words: memoryview
    _word: int
    _owner: int

    def __init__(self) -> None:
        """Create a new root token (not cancelled, no parent)."""
        arena = Arena.default()
        arena.lock()
        try:
            slot, live = arena.alloc(0)
        finally:
            arena.unlock()
        self._bind(arena, slot, live, os.getpid())

    def _bind(self, arena: Arena, slot: int, live: int, owner: int) -> None:
        self._arena = arena
        self._slot = slot
        self._live = live
        self._words = arena.words
        self._word = slot * SLOT_WORDS
        self._owner = owner  # 0: borrowed, holds no reference

    @classmethod
    def _from_slot(cls, arena: Arena, slot: int, live: int, owner: int) -> CancellationToken:
        token = cls.__new__(cls)
        token._bind(arena, slot, live, owner)
        return token

    def __del__(self) -> None:
        # A token inherited through fork belongs to the process that made it: only the owner
        # process gives its reference back.
        owner = getattr(self, "_owner", 0)
        if owner and not sys.is_finalizing() and owner == os.getpid():
            self._arena.release_later(self._slot, self._live)

    def child_token(self) -> CancellationToken:
        """Return a new child: cancelled with this token, but cancelling it leaves this one alone.

        The child of a cancelled token is born cancelled, with the parent's cause.
        """
        arena = self._arena
        arena.lock()
        try:
            slot, live = self._alloc_child()
        finally:
            arena.unlock()
        return self._from_slot(arena, slot, live, os.getpid())

    def _alloc_child(self) -> tuple[int, int]:
        """A new child's ``(slot, live)``, with the arena lock held."""
        arena = self._arena
        if (arena.words[self._word] ^ self._live) & GEN:
            slot, live = arena.alloc(0)  # our node is gone (see module header): orphan
            arena.cancel(slot, None)
            return slot, live
        return arena.alloc(self._slot)

    def cancel(self, reason: str | None = None) -> None:
        """Cancel this token and every descendant, in every process.

        Idempotent: only the first cancellation that reaches a node sets its ``cause``. Returns
        once every descendant reads as cancelled and its waiters have been woken.

        Args:
            reason: the ``cause`` to record; ``None`` records ``"cancelled"``.

        Raises:
            TypeError: ``reason`` is neither a str nor None.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None, not {type(reason).__name__}")
        self._arena.cancel_now_or_request(self._slot, self._live, reason)

    def is_cancelled(self) -> bool:
        """Return whether this token is cancelled: one load from shared memory, never blocks."""
        return self._words[self._word] != self._live and self._cancelled_after_all()

    def _cancelled_after_all(self) -> bool:
        """The word differs from ``live``: cancelled, gone, or only ``PULL`` (look up)."""
        if self._words[self._word] & ~PULL != self._live:
            return True
        return self._arena.pulled(self._slot, self._live)[0]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until this token is cancelled or ``timeout`` seconds pass.

        Args:
            timeout: seconds to wait; ``None`` waits forever, 0 only checks.

        Returns:
            True if the token is cancelled, False on timeout.

        Raises:
            TypeError, ValueError: ``timeout`` is not a number, is negative or NaN.
        """
        limit = check_timeout(timeout)
        if self.is_cancelled():
            return True
        if limit == 0:
            return False
        words, word, live = self._words, self._word, self._live
        words[word + HINT] = 1
        address = self._arena.address + word * 4
        deadline = None if limit is None else time.monotonic() + limit
        arena = self._arena
        while True:
            current = words[word]
            if current != live and current & ~PULL != live:
                return True
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
            if current == live:
                futex_wait(address, live, remaining)
            elif arena.wait_pulled(
                self._slot, live, remaining
            ):  # PULL only: see procsup._token.arena
                return True

    @property
    def cause(self) -> str | None:
        """None until cancelled; then the reason of the first cancellation that reached this token.

        That is its own ``cancel(reason)`` or an ancestor's, whichever came first (Go's
        ``context.Cause``); ``"cancelled"`` when that cancellation gave no reason.
        """
        words, word, live = self._words, self._word, self._live
        current = words[word]
        if current == live:
            return None
        arena = self._arena
        if current & ~PULL == live:
            cancelled, cause = arena.pulled(self._slot, live)
            return (cause or DEFAULT_REASON) if cancelled else None
        if (current ^ live) & GEN:
            return DEFAULT_REASON
        # Lock-free: a cancelled node's cause never changes while the node lives, nor does the
        # text of a record a live node refers to.
        text = arena.cause_text(words[word + CAUSE])
        if (words[word] ^ live) & GEN:
            return DEFAULT_REASON  # freed while we read (only a borrowed token can see that)
        return text

    async def cancelled(self) -> None:
        """Wait, without blocking the event loop, until this token is cancelled.

        The wait is a watch of the process's ``TokenWatch`` (``procsup._token.watch``), whose
        thread sleeps on every awaited token at once; cancelling the await ends the watch, and
        once nothing is awaited, the thread.
        """
        import asyncio  # not at module level: see procsup._supervision.aio

        if self.is_cancelled():
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        watched = awaiting().watch(self, functools.partial(_wake_loop, loop, done))
        try:
            await done
        finally:
            watched.cancel()

    async def run_until_cancelled(self, aw: Awaitable[T]) -> T | None:
        """Run ``aw`` until it finishes or this token is cancelled, whichever comes first.

        Returns:
            ``aw``'s result, or None if the token was cancelled first (then ``aw`` is cancelled,
            or never started at all if the token was already cancelled).
        """
        if self.is_cancelled():
            if isinstance(aw, Coroutine):
                aw.close()
            return None
        import asyncio

        work: asyncio.Future[T] = asyncio.ensure_future(aw)
        watcher = asyncio.ensure_future(self.cancelled())
        try:
            await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (work, watcher):
                if not future.done():
                    future.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await future
        if work.done() and not work.cancelled():
            return work.result()
        return None

    def drop_guard(self) -> DropGuard:
        """Return a context manager that cancels this token when its block exits."""
        return DropGuard(self)

    def __reduce__(self) -> tuple[Any, ...]:
        popen = multiprocessing.context.get_spawning_popen()
        if popen is None:
            raise TypeError(_PICKLE_HELP)
        arena = self._arena
        arena.lock()
        try:
            arena.incref(self._slot)  # in flight: the child adopts this reference
        finally:
            arena.unlock()
        return (_rebuild, (arena.key, arena.dup_for_child(popen), self._slot, self._live))

    def __copy__(self) -> CancellationToken:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> CancellationToken:
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CancellationToken):
            return NotImplemented
        return (self._arena.key, self._slot, self._live) == (
            other._arena.key,
            other._slot,
            other._live,
        )

    def __hash__(self) -> int:
        return hash((self._arena.key, self._slot, self._live))

    def __repr__(self) -> str:
        state = "cancelled" if self.is_cancelled() else "live"
        return f"<CancellationToken node={self._slot}.{self._live >> 1} {state}>"


def _wake_loop(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], cause: str) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(_set_done, done)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _rebuild(key: bytes, fd: Any, slot: int, live: int) -> CancellationToken:
    arena = Arena.adopt(key, fd)
    return CancellationToken._from_slot(arena, slot, live, os.getpid())


# Pickles name the package, as they did when it was one module (``procsup._token``); the public
# classes are named by their public path.
_rebuild.__module__ = "procsup._token"


def borrow_args(token: CancellationToken, popen: object) -> tuple[Any, ...]:
    """Picklable arguments of ``borrowed()`` for a process being started by ``popen``.

    Unlike pickling the token, this takes no reference: the guardian that borrows it (procsup's
    zygote) can cancel the node for as long as it lives, and a node freed meanwhile reads as
    cancelled there, so nothing is ever released twice.
    """
    arena = token._arena
    return (arena.key, arena.dup_for_child(popen), token._slot, token._live)


def borrowed(key: bytes, fd: Any, slot: int, live: int) -> CancellationToken:
    """A token on the node ``borrow_args()`` described, holding no reference to it."""
    return CancellationToken._from_slot(Arena.adopt(key, fd), slot, live, 0)


def node(token: CancellationToken) -> tuple[int, int]:
    """The ``(slot, live)`` naming ``token``'s node in its arena, for ``borrow_node()`` in another
    process that shares the arena (an executor's worker names the nodes its next items will run
    under; the executor cancels them through borrowed handles)."""
    return token._slot, token._live


def borrow_node(near: CancellationToken, slot: int, live: int) -> CancellationToken:
    """A token on the node ``(slot, live)`` of ``near``'s arena, holding no reference to it.

    Whoever made the node keeps it alive for as long as the borrower may use it; a node freed
    meanwhile reads as cancelled here, and nothing is ever released twice (as for ``borrowed()``).
    Nothing crosses a process boundary: only two integers travel, which any pipe can carry.
    """
    return CancellationToken._from_slot(near._arena, slot, live, 0)


def renew(
    parents: tuple[CancellationToken, ...], spent: tuple[CancellationToken, ...] = ()
) -> list[CancellationToken]:
    """One new child of each of ``parents``, and the references of ``spent`` given back, all
    under one hold of the arena lock (every token here shares one arena).

    An executor's worker does this once per item (``procsup._process.worker``): two children and
    two drops, which as ``child_token()`` calls and ``del`` statements are four holds of the lock:
    13.6 us against 9.3 us in one hold, measured here. The children are made first, so a spent
    token whose child is made here stays alive through it. A spent token then holds no
    reference, like a ``borrow_node()`` handle: it reads as cancelled once its node is freed,
    and dropping it gives nothing back.
    """
    arena = parents[0]._arena
    me = os.getpid()
    made: list[CancellationToken] = []
    arena.lock()
    try:
        for parent in parents:  # each wrapped at once: a raise below leaks no slot
            slot, live = parent._alloc_child()
            made.append(CancellationToken._from_slot(arena, slot, live, me))
        for token in spent:
            if token._owner == me:
                token._owner = 0
                arena.release_later(token._slot, token._live)  # queued: done as we unlock
    finally:
        arena.unlock()
    return made


def cancel_unstarted(token: CancellationToken, reason: str, patience: float = PATIENCE) -> bool:
    """Cancel ``token`` unless a child has been made of it; True if it now is cancelled and has
    no child, so that any child made of it from now on is born cancelled.

    One-way and atomic with ``child_token()`` in every process (both hold the arena lock): a
    process that marks "I started" by making a child, and another that takes the work back with
    this, never both win. False also when the node is gone, or when the arena lock was not had
    within ``patience`` seconds (its holder is stopped): then nothing was cancelled.
    """
    arena = token._arena
    if not arena.lock(patience=patience):
        return False
    try:
        return arena.cancel_unstarted(token._slot, token._live, reason)
    finally:
        arena.unlock()


def lock_is_free(token: CancellationToken) -> bool:
    """Whether ``token``'s arena lock could be taken just now (and was, and is given back).

    For the supervision thread before it starts a restart: a start must allocate under that lock,
    and a process stopped while holding it would stall the thread until it runs again.
    """
    return token._arena.settle()


def waited_on(token: CancellationToken) -> bool:
    """Whether anybody, in any process, has ever waited on ``token`` (its ``hint``): only then can
    its cancellation wake a thread."""
    return bool(token._words[token._word + HINT])


def prune(token: CancellationToken) -> None:
    """Free every descendant of ``token`` and give it back the one reference ``token`` holds.

    Only for the supervisor's token of a task whose process has been reaped: nothing but that
    task's process tree could hold its descendants or another reference, and a dead process never
    gives its references back (see ``procsup._token.arena``). A descendant still alive reads its
    nodes as cancelled from now on, and its later releases are ignored.
    """
    # Queued if the lock is busy: the supervision thread calls this and must never wait for
    # another process (a stopped one may hold the lock).
    token._arena.release_later(token._slot, token._live, prune=True)


class DropGuard:
    """Cancels its token when the ``with`` block exits, unless ``disarm()`` was called."""

    __slots__ = ("_token",)

    def __init__(self, token: CancellationToken) -> None:
        self._token: CancellationToken | None = token

    def disarm(self) -> CancellationToken:
        """Keep the token uncancelled when the block exits, and return it.

        Raises:
            RuntimeError: the guard was already disarmed or has already fired.
        """
        token = self._token
        if token is None:
            raise RuntimeError("this DropGuard was already disarmed or has already fired")
        self._token = None
        return token

    def __enter__(self) -> DropGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            token.cancel()


CancellationToken.__module__ = DropGuard.__module__ = "procsup"
