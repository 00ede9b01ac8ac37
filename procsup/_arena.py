"""The token arena: one shared mapping of cancellation-tree nodes, safe against any process dying.

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

Invariants of a slot (``SLOT_WORDS`` 32-bit words; slot 0 and 1 hold the header):

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

import ctypes
import fcntl
import mmap
import multiprocessing.reduction
import os
import threading
import uuid
import weakref
from collections import deque
from typing import Any, ClassVar

from procsup._futex import futex_wake

SLOT_WORDS = 8
_WORD, _REFS, _PARENT, CAUSE, HINT, _FIRST, _NEXT, _PREV = range(8)
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
_CAUSE_BASE = _SLOTS * SLOT_WORDS
_CAUSE_DEFAULT = 0xFFFFFFFF  # cancel() without a reason
_CAUSE_LOST = 0xFFFFFFFE  # every cause record is in use
DEFAULT_REASON = "cancelled"
_LOST_REASON = "cancelled (the cause was dropped: too many distinct live causes)"

_ARENA_BYTES = (_CAUSE_BASE + _CAUSES * _CAUSE_WORDS) * 4


class Arena:
    """One shared mapping of token slots, and this process's view of it.

    ``lock``/``unlock`` bracket every read-modify-write of shared words. ``_pending`` holds slot
    releases queued by ``__del__``, which must never block; whoever holds the lock drains it.
    ``_woken`` lists, under the lock, the slots changed since ``lock()`` whose waiters ``unlock()``
    must wake.
    """

    __slots__ = ("_pending", "_thread_lock", "_woken", "address", "fd", "key", "map", "words")

    _registry: ClassVar[dict[bytes, Arena]] = {}
    _default: ClassVar[Arena | None] = None
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
        self._pending: deque[tuple[int, int]] = deque()
        self._woken: list[int] = []
        if create:
            self.words[_H_HIGH] = _FIRST_SLOT
            self.words[_H_CAUSE_HIGH] = 1
            self.words[_H_MAGIC] = _MAGIC
        elif self.words[_H_MAGIC] != _MAGIC:
            raise RuntimeError("procsup: the token arena received from the parent is corrupt")

    @classmethod
    def default(cls) -> Arena:
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
    def adopt(cls, key: bytes, fd: Any) -> Arena:
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
        per_child = Arena._in_flight.setdefault(popen, {})
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
                slot, live = self._pending.popleft()
                # A node pruned meanwhile (procsup._token.prune) is in another gen: not ours.
                if self.words[slot * SLOT_WORDS + _WORD] >> 1 == live >> 1:
                    self._release(slot)
        finally:
            woken, self._woken = self._woken, []
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            self._thread_lock.release()
        # After unlock: the unlock syscall orders our stores of `word` before these loads of
        # `hint`, as a waiter's futex syscall orders its store of `hint` before the kernel's load
        # of `word`; so either we see its hint or it sees our word.
        words = self.words
        for slot in woken:
            if words[slot * SLOT_WORDS + HINT]:
                futex_wake(self.address + slot * SLOT_WORDS * 4)

    def release_later(self, slot: int, live: int) -> None:
        self._pending.append((slot, live))
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
            w[_H_FREE] = w[slot * SLOT_WORDS + _NEXT]
        else:
            slot = w[_H_HIGH]
            if slot >= _SLOTS:
                raise RuntimeError(f"procsup: more than {_SLOTS - _FIRST_SLOT} live tokens")
            w[_H_HIGH] = slot + 1
        base = slot * SLOT_WORDS
        live = w[base + _WORD] & ~1
        w[base + _PARENT] = parent
        w[base + HINT] = w[base + CAUSE] = w[base + _FIRST] = w[base + _NEXT] = 0
        word = live
        if parent:
            pbase = parent * SLOT_WORDS
            w[pbase + _REFS] += 1
            if w[pbase + _WORD] & 1:  # a child of a cancelled token is born cancelled
                cause = w[pbase + CAUSE]
                self._cause_ref(cause)
                w[base + CAUSE] = cause
                word |= 1
            self._journaled(_OP_LINK, slot, parent, w[pbase + _FIRST])
        w[base + _WORD] = word
        w[base + _REFS] = 1  # publish last: until now the slot reads as dead to every walk
        return slot, live

    def incref(self, slot: int) -> None:
        self.words[slot * SLOT_WORDS + _REFS] += 1

    def _release(self, slot: int) -> None:
        w = self.words
        while slot:
            base = slot * SLOT_WORDS
            refs = w[base + _REFS] - 1
            w[base + _REFS] = refs
            if refs:
                break
            parent, cause = w[base + _PARENT], w[base + CAUSE]
            if parent:
                self._journaled(_OP_UNLINK, slot, parent, w[base + _PREV], w[base + _NEXT])
            w[base + _WORD] = ((w[base + _WORD] >> 1) + 1 & 0x7FFFFFFF) << 1  # next gen, live
            self._woken.append(slot)
            w[base + _PARENT] = w[base + CAUSE] = 0
            self._cause_unref(cause)
            w[base + _NEXT] = w[_H_FREE]
            w[_H_FREE] = slot
            slot = parent

    def prune(self, root: int) -> None:
        """Free every node below ``root`` whatever its ``refs``, and set ``root``'s ``refs`` to 1.

        The subtree is cut off from ``root`` (one store) before any node is freed, so a holder
        killed halfway leaves unreachable nodes leaked, never a list another process could trip on.
        """
        w = self.words
        doomed: list[int] = []
        stack = [w[root * SLOT_WORDS + _FIRST]]
        budget = w[_H_HIGH]  # never loop forever on a corrupt list
        while stack and budget > 0:
            child = stack.pop()
            while child and budget > 0:
                budget -= 1
                doomed.append(child)
                stack.append(w[child * SLOT_WORDS + _FIRST])
                child = w[child * SLOT_WORDS + _NEXT]
        w[root * SLOT_WORDS + _FIRST] = 0
        w[root * SLOT_WORDS + _REFS] = 1
        for slot in doomed:
            base = slot * SLOT_WORDS
            if not w[base + _REFS]:
                continue  # already free (a release that was killed after unlinking)
            w[base + _REFS] = 0
            w[base + _WORD] = ((w[base + _WORD] >> 1) + 1 & 0x7FFFFFFF) << 1  # next gen, live
            self._woken.append(slot)
            cause = w[base + CAUSE]
            w[base + _PARENT] = w[base + CAUSE] = w[base + _FIRST] = 0
            self._cause_unref(cause)
            w[base + _NEXT] = w[_H_FREE]
            w[_H_FREE] = slot

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
            w[node * SLOT_WORDS + _PREV] = 0
            w[node * SLOT_WORDS + _NEXT] = c
            if c:
                w[c * SLOT_WORDS + _PREV] = node
            w[parent * SLOT_WORDS + _FIRST] = node
        elif op == _OP_UNLINK:  # c, d: the node's previous and next siblings
            if c:
                w[c * SLOT_WORDS + _NEXT] = d
            else:
                w[parent * SLOT_WORDS + _FIRST] = d
            if d:
                w[d * SLOT_WORDS + _PREV] = c
        w[_H_OP] = 0

    def cancel(self, slot: int, reason: str | None) -> None:
        w = self.words
        base = slot * SLOT_WORDS
        if not w[base + _WORD] & 1:
            w[base + CAUSE] = self._cause_new(reason)
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
            cause = w[parent * SLOT_WORDS + CAUSE] or _CAUSE_DEFAULT
            child = w[parent * SLOT_WORDS + _FIRST]
            while child and budget > 0:
                budget -= 1
                base = child * SLOT_WORDS
                if w[base + _REFS]:  # dead nodes still on a list (a killed release) are skipped
                    if not w[base + _WORD] & 1:
                        self._cause_ref(cause)
                        w[base + CAUSE] = cause
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
            return DEFAULT_REASON
        base = _CAUSE_BASE + cause * _CAUSE_WORDS
        offset = (base + 2) * 4
        return bytes(self.map[offset : offset + self.words[base + 1]]).decode("utf-8", "replace")


os.register_at_fork(after_in_child=Arena._after_fork)
