"""The token arena: one shared mapping of cancellation-tree nodes, safe against any process dying.

::

    process A                 arena: one memfd, MAP_SHARED in every process           process B
    ─────────                 ─────────────────────────────────────────────           ─────────
    token(slot 7, 2g)  ──▶  | header | slot 3 | ... | slot 7 | ... | causes |  ◀──  token(7, 2g)
                                         ▲ parent      word = 2g + cancelled
    is_cancelled(): one 32-bit load of slot.word, compared with 2g   (no lock, no syscall)
    wait():         FUTEX_WAIT on slot.word while it still reads 2g
    cancel():       under the arena lock: word |= 1 on the node, then on each live descendant
                    (a walk of first-child/next-sibling links, so O(subtree));
                    unlock; FUTEX_WAKE each newly cancelled node that has ever had a waiter.
                    If the lock is not had within ``PATIENCE`` (its holder is stopped: SIGSTOP, a
                    debugger, a cgroup freezer), file a request instead (below) and return.

A cancel that cannot wait for the lock (a stopped holder keeps it for as long as it is stopped)::

    canceller                                       arena                          readers
    ─────────                                       ─────                          ───────
    lockf(byte 1+e, LOCK_NB) claims a free entry ─▶ request e: slot, gen, cause
                                                    state = 1 (committed)
    FUTEX_WAKE_OP: word |= PULL on the node and ─▶  word of each node in the ──▶  word != live:
    on every node its lists reach, and wake            subtree                     slow path: an
                                                                                   ancestor-or-self
    the next lock holder (the stopped one once   ◀─ dirty requests: cancel()          cancelled, or
    it runs, or anybody once it dies) does the      under the lock, as if asked    named by a
    cancel() under the lock and frees entry e                                      committed request

A waiter whose word reads ``PULL`` only (covered by nothing, or not yet) sleeps on the header's
``epoch`` instead of its word, which a new request would not change: filers and lock holders move
the epoch and wake it whenever such waiters are counted (``wait_pulled``).

A token is a handle on one slot of an arena. An arena is created lazily, once per process family:
tokens pickled into a child carry the arena's fd (``multiprocessing.reduction.DupFd``), and the
child adopts that arena for the roots it creates, so a whole tree of processes shares one fd.

Invariants of a slot (``SLOT_WORDS`` 32-bit words; slots 0 to 2 hold the header):

- ``word`` is ``PULL * p + 2 * gen + c`` (``gen`` is 30 bits). ``gen`` changes exactly when the slot
  is freed, so a handle that outlives its slot (only possible for a token inherited through a bare
  ``os.fork``) reads as cancelled rather than aliasing a stranger. ``c`` never goes from 1 back to
  0 within a gen. ``p`` (``PULL``) says "a cancel request may cover you: look up"; it is the only
  bit ever set without the lock, atomically by the kernel (``futex_or_wake``), so it cannot undo a
  locked store. A node can carry it spuriously (it was freed and reused while a request's walk went
  by); its readers then take the slow path, which answers correctly, until the slot is freed.
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
- Only a holder of the arena lock writes a slot's words (``PULL`` aside). A request entry's words
  are written only by the process that holds its byte lock, and only while its ``state`` is 0;
  ``state`` 1 (committed) means every other word of the entry is final until the lock holder that
  carries it out sets ``state`` back to 0, after its ``cancel()`` has run.
- The header's ``requests`` word is 1 whenever a committed request may not have been carried out
  yet, or the journal holds ``RECHECK``: it is set before and after committing, and a lock holder
  clears it with ``RECHECK`` journaled, looks for committed entries after a fence (setting it
  again if it finds one), and only then clears the journal.

Every other multi-word update is ordered so that a process killed between any two stores leaves,
at worst, a slot or a cause record leaked (``refs`` too high), never a structure another process
could trip on.

Things that don't work
----------------------
- ``multiprocessing.Event``: measured here, a child SIGKILLed while spinning on ``is_set()`` left
  its lock held in 19 of 30 trials, blocking every other process forever; and ``set()`` blocks
  forever once a waiter has been SIGKILLed (python/cpython#75158: ``Condition.notify_all`` waits for
  a dead waiter). It is also ~15x slower to poll than a plain load.
- Any lock in shared memory (a ``multiprocessing.Lock``, a plain pthread mutex): a holder killed
  inside the critical section leaves it locked for good. (A robust pthread mutex survives a dead
  holder, but not a stopped one, and Python reaches it only through a C extension.) The arena lock
  is therefore ``fcntl.lockf`` on the memfd, which the kernel drops when its holder dies, plus a
  ``threading.Lock`` because POSIX record locks do not exclude threads of one process.
- Walking the ancestors in every ``is_cancelled()``: nine loads at depth 8 break the cost target;
  the cancelling side pays instead, once. Readers walk them (and read the 64 request entries, some
  microseconds) only while their word reads ``PULL``.
- A pipe or eventfd per node: 10,000 tokens would need 10,000 fds.
- Waiting for the lock without a bound: a holder that is stopped, not dead, keeps a record lock
  for as long as it is stopped, and every canceller (the supervision thread included) would stall
  behind it. Nor can a canceller take the lock over: the holder may resume in the middle of its
  critical section. Hence the requests.
- Writing ``c`` on a descendant without the lock: the slot may be freed and handed to a stranger
  between the check and the store (only the kernel's atomic OR of ``PULL`` is harmless there). A
  stranger reading ``PULL`` looks up and finds nothing; a stranger reading ``c`` would be
  cancelled.
- Reading ``PULL`` on every ``is_cancelled()``: the fast path stays one load and one compare
  (``word != live``), and ``PULL`` lives in the word itself so that a changed word is the only
  signal a reader needs.

Limits, while a stopped process holds the lock (none of them outlives its stop)
-------------------------------------------------------------------------------
- At most 64 requests wait at once; the next cancel() of another node waits for the lock.
- A token covered by cancels that raced each other (two requests, or a request and a walk under
  way) may read one of their causes, then, once they are carried out, the other: which came
  first has no order that every process sees the same way without a shared atomic counter. Each
  cause it reads is that of a cancellation that reached it.
- Token drops and prunes queued meanwhile wait for the next lock this process takes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import multiprocessing.reduction
import os
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from typing import Any, ClassVar

from procsup._os.forking import thread_repair
from procsup._token.futex import futex_add, futex_or_wake, futex_wait, futex_wake

SLOT_WORDS = 8
_WORD, _REFS, _PARENT, CAUSE, HINT, _FIRST, _NEXT, _PREV = range(8)
_SLOTS = 1 << 20  # 32 MiB of address space; pages are touched only as slots are used
_FIRST_SLOT = 3  # slots 0 to 2 hold the header, so a parent of 0 means "no parent"

PULL_BIT = 31
PULL = 1 << PULL_BIT  # "a request may cover you: look up" (see the module header)
GEN = 0x7FFFFFFE  # the gen bits of a word: two words name the same node iff they agree on these

# Header words (inside slots 0 to 2).
_H_MAGIC, _H_HIGH, _H_FREE, _H_CAUSE_HIGH, _H_CAUSE_FREE, _H_DIRTY = range(6)
_H_OP, _H_A, _H_B, _H_C, _H_D = range(6, 11)  # the redo journal of one sibling-list update
# Requests may be pending; the last request filed; a futex word nobody waits on (a fence).
_H_REQUESTS, _H_SEQ, _H_FENCE = range(11, 14)
# Bumped by every unlock, under the lock; how many wait for the lock with a deadline (a futex wait
# on _H_UNLOCKS: no timed wait exists for the record lock itself). Counts change atomically
# (futex_add); one left by a waiter that was killed costs each unlock a futile wake, nothing more.
_H_UNLOCKS, _H_LOCK_WAITERS = range(14, 16)
# Moved (atomically) and woken when a request is committed or a node changes under the lock while
# somebody waits on a word that reads PULL only (counted in _H_PULL_WAITERS): such a waiter sleeps
# here, since a word that already has PULL does not change when a new request covers it.
_H_EPOCH, _H_PULL_WAITERS = range(16, 18)
_OP_LINK, _OP_UNLINK, _OP_RECHECK = 1, 2, 3  # RECHECK: the requests word may be 0 wrongly
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

# Cancel requests follow the cause records: [state, slot, live, seq, version, then a cause record
# laid out as above]. Entry e is claimed by the byte lock on byte 1 + e of the memfd (the arena
# lock is byte 0), taken without waiting: a stopped or dead holder of one entry costs one entry.
_REQUESTS = 64
_R_STATE, _R_SLOT, _R_LIVE, _R_SEQ, _R_VERSION, _R_CAUSE = range(6)
_REQUEST_WORDS = _R_CAUSE + _CAUSE_WORDS
_REQUEST_BASE = _CAUSE_BASE + _CAUSES * _CAUSE_WORDS
_NO_REASON = 0xFFFFFFFF  # in a request's nbytes: cancel() without a reason

# How long cancel() waits for the arena lock before filing a request instead. The lock is held for
# microseconds; a holder not done after this long is stopped or starved, and a request costs
# nothing but a slower is_cancelled() in the subtree until the lock comes free. F_SETLKW has no
# timeout, so such a wait sleeps on a futex that every unlock bumps (see ``Arena.lock``).
PATIENCE = 0.01
_PULL_TRIES = 16  # walks of a subtree whose lists keep changing before leaving it to their changer

_ARENA_BYTES = (_REQUEST_BASE + _REQUESTS * _REQUEST_WORDS) * 4


class Arena:
    """One shared mapping of token slots, and this process's view of it.

    ``lock``/``unlock`` bracket every read-modify-write of shared words. ``_pending`` holds slot
    releases and prunes queued by callers that must not wait for the lock (``__del__``, the
    supervision thread); whoever holds the lock next drains it. ``_woken`` lists, under the lock,
    the slots changed since ``lock()`` whose waiters ``unlock()`` must wake. ``_request_lock``
    keeps this process's threads out of each other's request entries (record locks do not).
    """

    __slots__ = (
        "_pending",
        "_request_lock",
        "_thread_lock",
        "_woken",
        "address",
        "fd",
        "key",
        "map",
        "words",
    )

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
        self._request_lock = threading.Lock()
        self._pending: deque[tuple[int, int, bool]] = deque()
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
        for arena in cls._registry.values():
            if arena._pending:  # read, not written, when empty: the page stays shared
                arena._pending = deque()  # the parent drains its own

    @classmethod
    def _new_locks(cls) -> None:
        # Only another thread of the parent could have held them at the fork (thread_repair).
        cls._registry_lock = threading.Lock()
        for arena in cls._registry.values():
            arena._thread_lock = threading.Lock()
            arena._request_lock = threading.Lock()

    def lock(self, patience: float | None = None) -> bool:
        """Take the arena lock; with ``patience`` (seconds), give up after that long.

        Returns:
            True once held (always, without ``patience``); False if it was not had in time.
        """
        if patience is None:
            self._thread_lock.acquire()
        elif not self._thread_lock.acquire(blocking=False):
            deadline = time.monotonic() + patience
            if not patience or not self._thread_lock.acquire(timeout=patience):
                return False
            patience = max(deadline - time.monotonic(), 0.0)  # what is left of it
        try:
            if patience is None:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
            elif not self._try_byte(0) and not (patience and self._lock_within(patience)):
                self._thread_lock.release()
                return False
        except BaseException:
            self._thread_lock.release()
            raise
        if self.words[_H_OP]:
            self._redo()
        if self.words[_H_DIRTY]:
            self._cancel_descendants(self.words[_H_DIRTY])
        if self.words[_H_REQUESTS]:
            self._carry_out_requests()
        return True

    def _lock_within(self, patience: float) -> bool:
        """Take the record lock on byte 0 within ``patience`` seconds, sleeping between tries on
        the ``_H_UNLOCKS`` futex.

        No wake-up is lost: we count ourselves in ``_H_LOCK_WAITERS`` (an atomic add, a full
        barrier) before we read ``_H_UNLOCKS``, and the kernel compares it as it queues us; the
        holder bumps ``_H_UNLOCKS`` and then (after its unlock syscall) loads the count. So either
        we see the bump and do not sleep, or the holder sees us and wakes us. A holder that dies
        wakes nobody: its waiters then give up at their deadline and file a request.
        """
        deadline = time.monotonic() + patience
        w = self.words
        waiters = self.address + _H_LOCK_WAITERS * 4
        futex_add(waiters, 1, wake=False)
        try:
            while True:
                seen = w[_H_UNLOCKS]
                if self._try_byte(0):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                futex_wait(self.address + _H_UNLOCKS * 4, seen, remaining)
        finally:
            futex_add(waiters, -1, wake=False)

    def _try_byte(self, byte: int) -> bool:
        """Lock ``byte`` of the memfd if nobody else holds it; never blocks."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False

    def unlock(self) -> None:
        """Drain queued work, unlock, then wake the waiters of every slot changed meanwhile."""
        words = self.words
        try:
            while self._pending:
                slot, live, prune = self._pending.popleft()
                # A node pruned or freed meanwhile is in another gen: not ours.
                if (words[slot * SLOT_WORDS + _WORD] ^ live) & GEN:
                    continue
                if prune:
                    self.prune(slot)
                else:
                    self._release(slot)
            if words[_H_REQUESTS]:  # filed since lock() carried out the earlier ones
                self._carry_out_requests()
        finally:
            woken, self._woken = self._woken, []
            words[_H_UNLOCKS] = words[_H_UNLOCKS] + 1 & 0xFFFFFFFF
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
            self._thread_lock.release()
        # After unlock: the unlock syscall orders our stores of `word` before these loads of
        # `hint`, as a waiter's futex syscall orders its store of `hint` before the kernel's load
        # of `word`; so either we see its hint or it sees our word. Likewise for the counts of
        # lock waiters and PULL waiters, and for requests: a filer commits, then tries the lock
        # (both syscalls); we unlock, then look for requests. One of us carries it out.
        if words[_H_LOCK_WAITERS]:
            futex_wake(self.address + _H_UNLOCKS * 4)
        for slot in woken:
            if words[slot * SLOT_WORDS + HINT]:
                futex_wake(self.address + slot * SLOT_WORDS * 4)
        if woken and words[_H_PULL_WAITERS]:
            futex_add(self.address + _H_EPOCH * 4, 1, wake=True)
        if words[_H_REQUESTS]:
            self.settle()

    def settle(self) -> bool:
        """Take the lock if it is free this instant, and give it back: that carries out the
        requests and queued work pending. Returns whether the lock was free."""
        if not self.lock(patience=0):
            return False
        self.unlock()
        return True

    def holder(self) -> int | None:
        """The pid of the process holding the arena lock, or None (diagnostics and tests)."""
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(self.fd, fcntl.F_GETLK, query))
        return None if kind == fcntl.F_UNLCK else int(pid)

    def release_later(self, slot: int, live: int, *, prune: bool = False) -> None:
        """Queue giving back a reference (or pruning below ``slot``), done now if the lock is
        free: never waits for another process, and never for this one's own critical section
        (a GC pass can run ``__del__`` inside it)."""
        self._pending.append((slot, live, prune))
        self.settle()

    def cancel_now_or_request(self, slot: int, live: int, reason: str | None) -> None:
        """Cancel the node, waiting for the lock at most ``PATIENCE``, else file a request."""
        if not self.lock(patience=PATIENCE):
            if (self.words[slot * SLOT_WORDS + _WORD] ^ live) & GEN:
                return  # gone (a stale handle): its slot, and PULL, are a stranger's now
            if self._file_request(slot, live, reason):
                self._pull_subtree(slot)
                if self.words[_H_PULL_WAITERS]:  # after the atomic ORs: a full barrier
                    futex_add(self.address + _H_EPOCH * 4, 1, wake=True)
                self.settle()  # the holder may be gone by now: carry it out at once
                return
            self.lock()  # every entry holds a request not carried out yet: wait for the lock
        try:
            # A node that is gone reads as cancelled already (see the module header).
            if not (self.words[slot * SLOT_WORDS + _WORD] ^ live) & GEN:
                self.cancel(slot, reason)
        finally:
            self.unlock()

    def _file_request(self, slot: int, live: int, reason: str | None) -> bool:
        w = self.words
        with self._request_lock:
            first = os.getpid() % _REQUESTS  # processes start their search apart
            for i in range(_REQUESTS):
                entry = (first + i) % _REQUESTS
                if not self._try_byte(1 + entry):
                    continue  # another process is filing it (or is stopped doing so)
                try:
                    base = _REQUEST_BASE + entry * _REQUEST_WORDS
                    if w[base + _R_STATE]:
                        if w[base + _R_SLOT] == slot and not (w[base + _R_LIVE] ^ live) & GEN:
                            return True  # already asked for; the earlier reason wins anyway
                        continue
                    w[base + _R_SLOT] = slot
                    w[base + _R_LIVE] = live
                    seq = w[_H_SEQ] + 1 & 0xFFFFFFFF
                    w[_H_SEQ] = seq
                    w[base + _R_SEQ] = seq
                    w[base + _R_VERSION] = w[base + _R_VERSION] + 1 & 0xFFFFFFFF
                    if reason is None:
                        w[base + _R_CAUSE + 1] = _NO_REASON
                    else:
                        self._write_text(base + _R_CAUSE, reason)
                    # Set before and after the commit: a filer killed in between leaves it set,
                    # and a lock holder clearing it meanwhile looks at the entries again.
                    w[_H_REQUESTS] = 1
                    w[base + _R_STATE] = 1
                    w[_H_REQUESTS] = 1
                    return True
                finally:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1 + entry)
        return False

    def _pull_subtree(self, root: int) -> None:
        """Set ``PULL`` on ``root`` and every node its lists reach, waking each: without the lock,
        so a running holder may be changing the lists under us. Reads only, besides the kernel's
        atomic OR. A walk that finds a list changed starts again; if the lists keep changing, the
        holder changing them carries the request out when it unlocks (``unlock``)."""
        futex_or_wake(self.address + root * SLOT_WORDS * 4, PULL_BIT)
        for _ in range(_PULL_TRIES):
            if self._pull_walk(root):
                return

    def _pull_walk(self, root: int) -> bool:
        """One walk of ``_pull_subtree``; False if a list changed under it.

        A hop from a link (a parent's ``first`` or a sibling's ``next``) to a node is trusted only
        if, after the node's own links were read, the link still names the node and neither the
        node's nor the link owner's gen moved: a freed node's ``next`` leads into the free list,
        and its unlink changes the link to it before its gen moves.
        """
        w = self.words
        address = self.address
        budget = w[_H_HIGH]  # never loop forever on a list that keeps changing
        stack = [root]
        while stack:
            owner = stack.pop()
            owner_word = w[owner * SLOT_WORDS + _WORD]
            link = owner * SLOT_WORDS + _FIRST
            child = w[link]
            while child:
                budget -= 1
                if not _FIRST_SLOT <= child < _SLOTS or budget < 0:
                    return False
                base = child * SLOT_WORDS
                child_word = w[base + _WORD]
                futex_or_wake(address + base * 4, PULL_BIT)
                first, after = w[base + _FIRST], w[base + _NEXT]
                if (
                    w[link] != child
                    or (w[base + _WORD] ^ child_word) & GEN
                    or (w[owner * SLOT_WORDS + _WORD] ^ owner_word) & GEN
                ):
                    return False
                if first:
                    stack.append(child)
                owner, owner_word, link, child = child, child_word, base + _NEXT, after
        return True

    def wait_pulled(self, slot: int, live: int, timeout: float | None) -> bool:
        """For a word that reads ``PULL`` only: True if the node is cancelled (or gone) after all;
        else sleep until a request is committed or a node changes, or ``timeout`` passes, and
        return False for the caller to look again."""
        w = self.words
        count = self.address + _H_PULL_WAITERS * 4
        futex_add(count, 1, wake=False)  # a full barrier before the loads below
        try:
            epoch = w[_H_EPOCH]
            if w[slot * SLOT_WORDS + _WORD] & ~PULL != live or self.pulled(slot, live)[0]:
                return True
            futex_wait(self.address + _H_EPOCH * 4, epoch, timeout)
            return False
        finally:
            futex_add(count, -1, wake=False)

    def count_pull_waiter(self, delta: int) -> tuple[int, int]:
        """Count (``delta`` 1) or uncount (-1) a waiter sleeping on the epoch, as ``wait_pulled``
        does for its one word: a watcher of many words (``procsup._token.watch``) sleeps on the
        epoch too while one of them reads ``PULL`` only. Returns the epoch's address and value."""
        futex_add(self.address + _H_PULL_WAITERS * 4, delta, wake=False)  # a full barrier
        return self.address + _H_EPOCH * 4, self.words[_H_EPOCH]

    def wake_pulled(self) -> None:
        """Wake every waiter sleeping in ``wait_pulled`` (they look again)."""
        futex_add(self.address + _H_EPOCH * 4, 1, wake=True)

    def _carry_out_requests(self) -> None:
        """Under the lock: cancel() what each committed request asked for, in filing order."""
        w = self.words
        while w[_H_REQUESTS]:
            committed = []
            for entry in range(_REQUESTS):
                base = _REQUEST_BASE + entry * _REQUEST_WORDS
                if w[base + _R_STATE]:
                    committed.append((w[base + _R_SEQ], base))
            for _, base in sorted(committed):
                slot, live = w[base + _R_SLOT], w[base + _R_LIVE]
                if _FIRST_SLOT <= slot < _SLOTS and not (w[slot * SLOT_WORDS + _WORD] ^ live) & GEN:
                    self.cancel(slot, self._read_text(base + _R_CAUSE))
                w[base + _R_STATE] = 0  # after cancel(): a reader that saw it never sees a gap
            # Clear the word, then look again for requests filed meanwhile. A holder killed
            # between the two would strand them: the journal says so to the next one.
            w[_H_OP] = _OP_RECHECK
            w[_H_REQUESTS] = 0
            self._fence()
            if any(
                w[_REQUEST_BASE + entry * _REQUEST_WORDS + _R_STATE] for entry in range(_REQUESTS)
            ):
                w[_H_REQUESTS] = 1  # filed while we worked: go round again
            w[_H_OP] = 0

    def _fence(self) -> None:
        """A full barrier between this thread's earlier stores and later loads: the kernel's
        futex_wake issues one (smp_mb in futex_hb_waiters_pending) before it finds nobody to
        wake."""
        futex_wake(self.address + _H_FENCE * 4)

    def pulled(self, slot: int, live: int) -> tuple[bool, str | None]:
        """Without the lock: is the node cancelled after all, and why, when its word says only
        ``PULL``? Cancelled if it or an ancestor has ``c`` (a walk not finished) or a committed
        request names it or an ancestor. Returns (cancelled, cause)."""
        w = self.words
        while True:
            requests = self._committed_requests()
            if requests is None:
                continue  # an entry changed while we read it
            node, budget = slot, w[_H_HIGH]
            best: tuple[int, str | None] | None = None
            while _FIRST_SLOT <= node < _SLOTS and budget > 0:
                budget -= 1
                word = w[node * SLOT_WORDS + _WORD]
                if node == slot and (word ^ live) & GEN:
                    return True, DEFAULT_REASON  # our node is gone
                if word & 1:
                    return True, self.cause_text(w[node * SLOT_WORDS + CAUSE])
                found = requests.get((node, word & GEN))
                if found is not None and (best is None or found[0] < best[0]):
                    best = found
                node = w[node * SLOT_WORDS + _PARENT]
            if best is not None:
                return True, best[1]
            return False, None

    def _committed_requests(self) -> dict[tuple[int, int], tuple[int, str | None]] | None:
        """The committed entries, by (slot, gen bits): (seq, reason). None if one changed while
        it was read (its version moved)."""
        w = self.words
        found: dict[tuple[int, int], tuple[int, str | None]] = {}
        for entry in range(_REQUESTS):
            base = _REQUEST_BASE + entry * _REQUEST_WORDS
            if not w[base + _R_STATE]:
                continue
            version = w[base + _R_VERSION]
            key = (w[base + _R_SLOT], w[base + _R_LIVE] & GEN)
            seq, text = w[base + _R_SEQ], self._read_text(base + _R_CAUSE)
            if not w[base + _R_STATE] or w[base + _R_VERSION] != version:
                return None
            if key not in found or seq < found[key][0]:
                found[key] = (seq, text)
        return found

    def _write_text(self, base: int, reason: str) -> None:
        """Write ``reason`` into the cause record at word ``base`` (refs untouched)."""
        data = reason.encode("utf-8", "backslashreplace")
        if len(data) > _CAUSE_TEXT:
            data = data[: _CAUSE_TEXT - 3].decode("utf-8", "ignore").encode() + "…".encode()
        offset = (base + 2) * 4
        self.map[offset : offset + len(data)] = data
        self.words[base + 1] = len(data)

    def _read_text(self, base: int) -> str | None:
        """The text of the cause record at word ``base``; None for a request without a reason."""
        nbytes = self.words[base + 1]
        if nbytes == _NO_REASON:
            return None
        offset = (base + 2) * 4
        nbytes = min(nbytes, _CAUSE_TEXT)
        return bytes(self.map[offset : offset + nbytes]).decode("utf-8", "replace")

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
        live = w[base + _WORD] & GEN
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
            w[base + _WORD] = (w[base + _WORD] + 2) & GEN  # next gen, live, no PULL
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
            w[base + _WORD] = (w[base + _WORD] + 2) & GEN  # next gen, live, no PULL
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
        elif op == _OP_RECHECK:  # a holder died clearing the requests word: lock() looks again
            w[_H_REQUESTS] = 1
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

    def cancel_unstarted(self, slot: int, live: int, reason: str | None) -> bool:
        """Cancel the node unless it has a live child; True if it is now cancelled and childless.

        ``alloc`` links a child under the same lock, so a child made meanwhile was made either
        before (False here) or after, born cancelled (True here). A node that is gone gives False.
        """
        w = self.words
        base = slot * SLOT_WORDS
        if (w[base + _WORD] ^ live) & GEN:
            return False
        child = w[base + _FIRST]
        budget = w[_H_HIGH]  # never loop forever on a corrupt list
        while child and budget > 0:
            budget -= 1
            if w[child * SLOT_WORDS + _REFS]:  # dead nodes on the list (a killed release) aside
                return False
            child = w[child * SLOT_WORDS + _NEXT]
        self.cancel(slot, reason)
        return True

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
        base = _CAUSE_BASE + record * _CAUSE_WORDS
        self._write_text(base, reason)
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
        return self._read_text(_CAUSE_BASE + cause * _CAUSE_WORDS) or DEFAULT_REASON


os.register_at_fork(after_in_child=Arena._after_fork)
os.register_at_fork(after_in_child=thread_repair(Arena._new_locks))
