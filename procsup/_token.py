"""The cancellation tree: tokens that cross processes and survive any process dying.

::

    process A                 arena: one memfd, MAP_SHARED in every process           process B
    ─────────                 ─────────────────────────────────────────────           ─────────
    token(slot 7, 2g)  ──▶  | header | slot 2 | ... | slot 7 | ... | causes |  ◀──  token(7, 2g)
                                         ▲ parent      word = 2g + cancelled
    is_cancelled(): one 32-bit load of slot.word, compared with 2g   (no lock, no syscall)
    wait():         FUTEX_WAIT on slot.word while it still reads 2g
    cancel():       under the arena lock: word |= 1 on the node, then on each live descendant
                    (a walk of first-child/next-sibling links, so O(subtree));
                    unlock; FUTEX_WAKE each newly cancelled node that has ever had a waiter.

A token is a handle on one slot of an arena. An arena is created lazily, once per process family:
tokens pickled into a child carry the arena's fd (``multiprocessing.reduction.DupFd``), and the
child adopts that arena for the roots it creates, so a whole tree of processes shares one fd.

Invariants of a slot (``_SLOT_WORDS`` 32-bit words; slot 0 and 1 hold the header):

- ``word`` is ``2 * gen + c``. ``gen`` changes exactly when the slot is freed, so a handle that
  outlives its slot (only possible for a token inherited through a bare ``os.fork``) reads as
  cancelled rather than aliasing a stranger. ``c`` never goes from 1 back to 0 within a gen.
- ``refs > 0`` iff the slot is live. ``refs`` counts token objects in any process, pickles in
  flight to a child that will adopt them, and live children (a child keeps its parent's slot, so
  dropping a token never cuts grandchildren off from their grandparent).
- ``cause`` is non-zero iff ``c`` is 1, and is written before ``c``, under the lock.
- A live node whose parent is cancelled is cancelled, except inside ``cancel()`` or after a
  canceller died mid-walk; the header's ``dirty`` word names the walk's root exactly then, and the
  next lock holder that sees it walks again.
- ``first``/``next``/``prev`` link every live child into its parent's list of children, except
  while a link or unlink is under way; the header's journal (``op`` and its arguments, written
  before ``op``) is non-zero exactly then, and the next lock holder that sees it redoes the steps,
  which are idempotent.
- ``hint`` is 1 once anybody has waited on the slot; it is never cleared while the slot lives.

Every other multi-word update is ordered so that a process killed between any two stores leaves,
at worst, a slot or a cause record leaked (``refs`` too high), never a structure another process
could trip on.

Things that don't work
----------------------
- ``multiprocessing.Event``: measured here, a child SIGKILLed while spinning on ``is_set()`` left
  its lock held in 19 of 30 trials, blocking every other process forever; and ``set()`` blocks
  forever once a waiter has been SIGKILLed (python/cpython#75158: ``Condition.notify_all`` waits for
  a dead waiter). It is also ~15x slower to poll than a plain load.
- Any lock in shared memory (a ``multiprocessing.Lock``, a pthread mutex): a holder killed inside
  the critical section leaves it locked for good. The arena lock is therefore ``fcntl.lockf`` on the
  memfd, which the kernel drops when its holder dies, plus a ``threading.Lock`` because POSIX record
  locks do not exclude threads of one process.
- Walking the ancestors in ``is_cancelled()``: nine loads at depth 8 break the cost target; the
  cancelling side pays instead, once.
- A pipe or eventfd per node: 10,000 tokens would need 10,000 fds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import math
import mmap
import multiprocessing.context
import multiprocessing.reduction
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from procsup._futex import futex_wait, futex_wake

__all__ = ["CancellationToken", "DropGuard", "check_timeout"]

T = TypeVar("T")

# Slot layout, in 32-bit words.
_SLOT_WORDS = 8
_WORD, _REFS, _PARENT, _CAUSE, _HINT, _FIRST, _NEXT, _PREV = range(8)
_SLOTS = 1 << 20  # 32 MiB of address space; pages are touched only as slots are used
_FIRST_SLOT = 2  # slots 0 and 1 hold the header, so a parent of 0 means "no parent"

# Header words (inside slots 0 and 1).
_H_MAGIC, _H_HIGH, _H_FREE, _H_CAUSE_HIGH, _H_CAUSE_FREE, _H_DIRTY = range(6)
_H_OP, _H_A, _H_B, _H_C, _H_D = range(6, 11)  # the redo journal of one sibling-list update
_OP_LINK, _OP_UNLINK = 1, 2
_MAGIC = 0x50524F43  # "PROC"

# Cause records follow the slots: [refs, nbytes, utf-8 text...].
_CAUSE_WORDS = 256  # 1 KiB per record
_CAUSE_TEXT = (_CAUSE_WORDS - 2) * 4
_CAUSES = 1 << 14
_CAUSE_BASE = _SLOTS * _SLOT_WORDS
_CAUSE_DEFAULT = 0xFFFFFFFF  # cancel() without a reason
_CAUSE_LOST = 0xFFFFFFFE  # every cause record is in use
_DEFAULT_REASON = "cancelled"
_LOST_REASON = "cancelled (the cause was dropped: too many distinct live causes)"

_ARENA_BYTES = (_CAUSE_BASE + _CAUSES * _CAUSE_WORDS) * 4

_PICKLE_HELP = (
    "a CancellationToken can cross into another process only as an argument of that process "
    "when it starts: pass it in Supervisor.spawn(..., args=...), CriticalTaskExecutionHandle("
    "..., args=...) or multiprocessing.Process(args=...), not through a Queue, a Pipe or pickle"
)


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """Validate a timeout in seconds: ``None`` or infinity mean no limit, 0 means do not block."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


class _Arena:
    """One shared mapping of token slots, and this process's view of it.

    ``lock``/``unlock`` bracket every read-modify-write of shared words. ``_pending`` holds slot
    releases queued by ``__del__``, which must never block; whoever holds the lock drains it.
    ``_woken`` lists, under the lock, the slots changed since ``lock()`` whose waiters ``unlock()``
    must wake.
    """

    __slots__ = ("_pending", "_thread_lock", "_woken", "address", "fd", "key", "map", "words")

    _registry: ClassVar[dict[bytes, _Arena]] = {}
    _default: ClassVar[_Arena | None] = None
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _in_flight: ClassVar[weakref.WeakKeyDictionary[object, dict[bytes, Any]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, fd: int, key: bytes, *, create: bool) -> None:
        self.fd = fd
        self.key = key
        if create:
            os.ftruncate(fd, _ARENA_BYTES)
        self.map = mmap.mmap(fd, _ARENA_BYTES, mmap.MAP_SHARED)
        self.words = memoryview(self.map).cast("I")
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._thread_lock = threading.Lock()
        self._pending: deque[int] = deque()
        self._woken: list[int] = []
        if create:
            self.words[_H_HIGH] = _FIRST_SLOT
            self.words[_H_CAUSE_HIGH] = 1
            self.words[_H_MAGIC] = _MAGIC
        elif self.words[_H_MAGIC] != _MAGIC:
            raise RuntimeError("procsup: the token arena received from the parent is corrupt")

    @classmethod
    def default(cls) -> _Arena:
        arena = cls._default
        if arena is None:
            with cls._registry_lock:
                if cls._default is None:
                    key = uuid.uuid4().bytes
                    fd = os.memfd_create("procsup-tokens", os.MFD_CLOEXEC)
                    cls._default = cls._registry[key] = cls(fd, key, create=True)
                arena = cls._default
        return arena

    @classmethod
    def adopt(cls, key: bytes, fd: Any) -> _Arena:
        """Map the arena a token arrived with; ``fd`` is the ``DupFd`` its pickle carried."""
        with cls._registry_lock:
            arena = cls._registry.get(key)
            if arena is None:
                number = fd.detach()
                os.set_inheritable(number, False)
                arena = cls._registry[key] = cls(number, key, create=False)
                if cls._default is None:
                    cls._default = arena
            return arena

    def dup_for_child(self, popen: object) -> Any:
        """One ``DupFd`` per child: every token pickled into it shares it (pickle memoizes it)."""
        per_child = _Arena._in_flight.setdefault(popen, {})
        if self.key not in per_child:
            per_child[self.key] = multiprocessing.reduction.DupFd(self.fd)
        return per_child[self.key]

    @classmethod
    def _after_fork(cls) -> None:
        cls._registry_lock = threading.Lock()
        for arena in cls._registry.values():
            arena._thread_lock = threading.Lock()
            arena._pending = deque()  # the parent drains its own

    def lock(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        if self.words[_H_OP]:
            self._redo()
        if self.words[_H_DIRTY]:
            self._cancel_descendants(self.words[_H_DIRTY])

    def unlock(self) -> None:
        """Drain queued releases, unlock, then wake the waiters of every slot changed meanwhile."""
        try:
            while self._pending:
                self._release(self._pending.popleft())
        finally:
            woken, self._woken = self._woken, []
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            self._thread_lock.release()
        # After unlock: the unlock syscall orders our stores of `word` before these loads of
        # `hint`, as a waiter's futex syscall orders its store of `hint` before the kernel's load
        # of `word`; so either we see its hint or it sees our word.
        words = self.words
        for slot in woken:
            if words[slot * _SLOT_WORDS + _HINT]:
                futex_wake(self.address + slot * _SLOT_WORDS * 4)

    def release_later(self, slot: int) -> None:
        self._pending.append(slot)
        if self._thread_lock.acquire(blocking=False):
            # Not inside one of our own critical sections (a GC pass can run __del__ there).
            self._thread_lock.release()
            self.lock()
            self.unlock()

    # Everything below runs under the lock.

    def alloc(self, parent: int) -> tuple[int, int]:
        w = self.words
        slot = w[_H_FREE]
        if slot:
            w[_H_FREE] = w[slot * _SLOT_WORDS + _NEXT]
        else:
            slot = w[_H_HIGH]
            if slot >= _SLOTS:
                raise RuntimeError(f"procsup: more than {_SLOTS - _FIRST_SLOT} live tokens")
            w[_H_HIGH] = slot + 1
        base = slot * _SLOT_WORDS
        live = w[base + _WORD] & ~1
        w[base + _PARENT] = parent
        w[base + _HINT] = w[base + _CAUSE] = w[base + _FIRST] = w[base + _NEXT] = 0
        word = live
        if parent:
            pbase = parent * _SLOT_WORDS
            w[pbase + _REFS] += 1
            if w[pbase + _WORD] & 1:  # a child of a cancelled token is born cancelled
                cause = w[pbase + _CAUSE]
                self._cause_ref(cause)
                w[base + _CAUSE] = cause
                word |= 1
            self._journaled(_OP_LINK, slot, parent, w[pbase + _FIRST])
        w[base + _WORD] = word
        w[base + _REFS] = 1  # publish last: until now the slot reads as dead to every walk
        return slot, live

    def incref(self, slot: int) -> None:
        self.words[slot * _SLOT_WORDS + _REFS] += 1

    def _release(self, slot: int) -> None:
        w = self.words
        while slot:
            base = slot * _SLOT_WORDS
            refs = w[base + _REFS] - 1
            w[base + _REFS] = refs
            if refs:
                break
            parent, cause = w[base + _PARENT], w[base + _CAUSE]
            if parent:
                self._journaled(_OP_UNLINK, slot, parent, w[base + _PREV], w[base + _NEXT])
            w[base + _WORD] = ((w[base + _WORD] >> 1) + 1 & 0x7FFFFFFF) << 1  # next gen, live
            self._woken.append(slot)
            w[base + _PARENT] = w[base + _CAUSE] = 0
            self._cause_unref(cause)
            w[base + _NEXT] = w[_H_FREE]
            w[_H_FREE] = slot
            slot = parent

    def _journaled(self, op: int, a: int, b: int, c: int, d: int = 0) -> None:
        """Relink siblings; a holder killed halfway leaves the journal for the next to redo."""
        w = self.words
        w[_H_A], w[_H_B], w[_H_C], w[_H_D] = a, b, c, d
        w[_H_OP] = op  # commit point: from here the steps below are redone until finished
        self._redo()

    def _redo(self) -> None:
        w = self.words
        op, node, parent, c, d = w[_H_OP], w[_H_A], w[_H_B], w[_H_C], w[_H_D]
        if op == _OP_LINK:  # c: parent's first child before the link
            w[node * _SLOT_WORDS + _PREV] = 0
            w[node * _SLOT_WORDS + _NEXT] = c
            if c:
                w[c * _SLOT_WORDS + _PREV] = node
            w[parent * _SLOT_WORDS + _FIRST] = node
        elif op == _OP_UNLINK:  # c, d: the node's previous and next siblings
            if c:
                w[c * _SLOT_WORDS + _NEXT] = d
            else:
                w[parent * _SLOT_WORDS + _FIRST] = d
            if d:
                w[d * _SLOT_WORDS + _PREV] = c
        w[_H_OP] = 0

    def cancel(self, slot: int, reason: str | None) -> None:
        w = self.words
        base = slot * _SLOT_WORDS
        if not w[base + _WORD] & 1:
            w[base + _CAUSE] = self._cause_new(reason)
            w[base + _WORD] |= 1
            self._woken.append(slot)
        if w[base + _FIRST]:
            self._cancel_descendants(slot)

    def _cancel_descendants(self, root: int) -> None:
        """Cancel every live descendant of the cancelled ``root``, each with its parent's cause."""
        w = self.words
        w[_H_DIRTY] = root  # a holder killed mid-walk leaves this for the next to finish
        budget = w[_H_HIGH]  # more steps than slots would mean a cycle: never loop forever
        stack = [root]
        while stack and budget > 0:
            parent = stack.pop()
            cause = w[parent * _SLOT_WORDS + _CAUSE] or _CAUSE_DEFAULT
            child = w[parent * _SLOT_WORDS + _FIRST]
            while child and budget > 0:
                budget -= 1
                base = child * _SLOT_WORDS
                if w[base + _REFS]:  # dead nodes still on a list (a killed release) are skipped
                    if not w[base + _WORD] & 1:
                        self._cause_ref(cause)
                        w[base + _CAUSE] = cause
                        w[base + _WORD] |= 1
                        self._woken.append(child)
                    if w[base + _FIRST]:
                        stack.append(child)
                child = w[base + _NEXT]
        w[_H_DIRTY] = 0

    def _cause_new(self, reason: str | None) -> int:
        if reason is None:
            return _CAUSE_DEFAULT
        w = self.words
        record = w[_H_CAUSE_FREE]
        if record:
            w[_H_CAUSE_FREE] = w[_CAUSE_BASE + record * _CAUSE_WORDS]
        else:
            record = w[_H_CAUSE_HIGH]
            if record >= _CAUSES:
                return _CAUSE_LOST
            w[_H_CAUSE_HIGH] = record + 1
        data = reason.encode("utf-8", "backslashreplace")
        if len(data) > _CAUSE_TEXT:
            data = data[: _CAUSE_TEXT - 3].decode("utf-8", "ignore").encode() + "…".encode()
        base = _CAUSE_BASE + record * _CAUSE_WORDS
        offset = (base + 2) * 4
        self.map[offset : offset + len(data)] = data
        w[base + 1] = len(data)
        w[base] = 1
        return record

    def _cause_ref(self, cause: int) -> None:
        if 0 < cause < _CAUSES:
            self.words[_CAUSE_BASE + cause * _CAUSE_WORDS] += 1

    def _cause_unref(self, cause: int) -> None:
        if 0 < cause < _CAUSES:
            w = self.words
            base = _CAUSE_BASE + cause * _CAUSE_WORDS
            w[base] -= 1
            if not w[base]:
                w[base] = w[_H_CAUSE_FREE]  # a free record's refs word links the free list
                w[_H_CAUSE_FREE] = cause

    def cause_text(self, cause: int) -> str:
        if cause == _CAUSE_LOST:
            return _LOST_REASON
        if not 0 < cause < _CAUSES:
            return _DEFAULT_REASON
        base = _CAUSE_BASE + cause * _CAUSE_WORDS
        offset = (base + 2) * 4
        return bytes(self.map[offset : offset + self.words[base + 1]]).decode("utf-8", "replace")


os.register_at_fork(after_in_child=_Arena._after_fork)


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

    _arena: _Arena
    _slot: int
    _live: int
    _words: memoryview
    _word: int
    _owner: int

    def __init__(self) -> None:
        """Create a new root token (not cancelled, no parent)."""
        arena = _Arena.default()
        arena.lock()
        try:
            slot, live = arena.alloc(0)
        finally:
            arena.unlock()
        self._bind(arena, slot, live, os.getpid())

    def _bind(self, arena: _Arena, slot: int, live: int, owner: int) -> None:
        self._arena = arena
        self._slot = slot
        self._live = live
        self._words = arena.words
        self._word = slot * _SLOT_WORDS
        self._owner = owner  # 0: borrowed, holds no reference

    @classmethod
    def _from_slot(cls, arena: _Arena, slot: int, live: int, owner: int) -> CancellationToken:
        token = cls.__new__(cls)
        token._bind(arena, slot, live, owner)
        return token

    def __del__(self) -> None:
        # A token inherited through fork belongs to the process that made it: only the owner
        # process gives its reference back.
        owner = getattr(self, "_owner", 0)
        if owner and not sys.is_finalizing() and owner == os.getpid():
            self._arena.release_later(self._slot)

    def child_token(self) -> CancellationToken:
        """Return a new child: cancelled with this token, but cancelling it leaves this one alone.

        The child of a cancelled token is born cancelled, with the parent's cause.
        """
        arena = self._arena
        arena.lock()
        try:
            if arena.words[self._word] >> 1 != self._live >> 1:
                slot, live = arena.alloc(0)  # our node is gone (see module header): orphan
                arena.cancel(slot, None)
            else:
                slot, live = arena.alloc(self._slot)
        finally:
            arena.unlock()
        return self._from_slot(arena, slot, live, os.getpid())

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
        arena = self._arena
        arena.lock()
        try:
            # A node that is gone reads as cancelled already (see the module header).
            if arena.words[self._word] >> 1 == self._live >> 1:
                arena.cancel(self._slot, reason)
        finally:
            arena.unlock()

    def is_cancelled(self) -> bool:
        """Return whether this token is cancelled: one load from shared memory, never blocks."""
        return self._words[self._word] != self._live

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
        words, word, live = self._words, self._word, self._live
        if words[word] != live:
            return True
        if limit == 0:
            return False
        words[word + _HINT] = 1
        address = self._arena.address + word * 4
        deadline = None if limit is None else time.monotonic() + limit
        while words[word] == live:
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
            futex_wait(address, live, remaining)
        return True

    @property
    def cause(self) -> str | None:
        """None until cancelled; then the reason of the first cancellation that reached this token.

        That is its own ``cancel(reason)`` or an ancestor's, whichever came first (Go's
        ``context.Cause``); ``"cancelled"`` when that cancellation gave no reason.
        """
        if self._words[self._word] == self._live:
            return None
        arena = self._arena
        arena.lock()
        try:
            if arena.words[self._word] >> 1 != self._live >> 1:
                return _DEFAULT_REASON
            return arena.cause_text(arena.words[self._word + _CAUSE])
        finally:
            arena.unlock()

    async def cancelled(self) -> None:
        """Wait, without blocking the event loop, until this token is cancelled."""
        if self.is_cancelled():
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        aborted = threading.Event()
        thread = threading.Thread(
            target=self._wait_for_loop,
            args=(loop, done, aborted),
            name="procsup-token-waiter",
            daemon=True,
        )
        thread.start()
        try:
            await done
        finally:
            if not done.done() or done.cancelled():
                aborted.set()
                futex_wake(self._arena.address + self._word * 4)

    def _wait_for_loop(
        self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], aborted: threading.Event
    ) -> None:
        words, word, live = self._words, self._word, self._live
        words[word + _HINT] = 1
        address = self._arena.address + word * 4
        while words[word] == live and not aborted.is_set():
            futex_wait(address, live, None)
        if not aborted.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_set_done, done)

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


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _rebuild(key: bytes, fd: Any, slot: int, live: int) -> CancellationToken:
    arena = _Arena.adopt(key, fd)
    return CancellationToken._from_slot(arena, slot, live, os.getpid())


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
