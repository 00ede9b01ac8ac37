"""Watching many tokens from one thread: a callback when any of them is cancelled.

::

    any thread                                    a shard: one thread, up to PER_SHARD tokens
    ──────────                                    ─────────────────────────────────────────────
    watch(token, callback) ─▶ entry added ──────▶ each pass, for every entry: hint := 1, then
                              control word += 1     word == live       ─▶ sleep on it
                              FUTEX_WAKE            cancelled or gone  ─▶ callback(cause), dropped
                                                    PULL only          ─▶ look up (arena.pulled);
                                                                          still live: sleep on it
                                                                          and on the arena's epoch
                                                  futex_waitv(control word, the words, epochs):
                                                    any of them woken or changed ─▶ next pass
    Watched.cancel() ─▶ entry dropped (its word is left out of the next pass; with idle_exit, the
                        last one's drop bumps the control word, and the thread ends)

A cancellation wakes the watcher exactly as it wakes a thread in ``CancellationToken.wait()``:
``cancel()`` wakes every newly cancelled node whose ``hint`` is set (``procsup._token.arena``),
and the watcher sets it before its first look, its futex syscall ordering that store before the
kernel's load of the word.

``await token.cancelled()`` is a watch too: ``awaiting()`` is the process's watch for it (and for
a restart's backoff), whose threads end whenever nothing is watched (``idle_exit``) and which a
forked child starts afresh.

Things that don't work
----------------------
- A thread per token blocked in ``wait()``: a supervisor of a thousand remote tasks would hold a
  thousand threads, and every start and end of one pays for a thread's creation and wake-up
  (about a millisecond of a loaded 2-core machine, measured on a Ray start-to-result).
- A thread per ``await token.cancelled()``, told to leave by a flag and a ``futex_wake`` on the
  token's word: a wake that comes between the thread's look at the flag and its ``futex_wait``
  is lost, and the thread sleeps until the token is cancelled, perhaps forever (what
  ``cancelled()`` once did: of 5,000 awaits aborted at once, each on a fresh token, a third
  or more left their thread asleep). Only a word of our own, slept on beside the token's (the
  control word here), can say "leave" without that race.
- ``futex_wait`` on one word after another: a cancellation of any other token waits for the one
  being slept on.
- Sleeping on a word as read again after it was judged live: a ``cancel()`` between the two
  looks has sent its wake before the sleep, and the kernel, finding the value it was given,
  sleeps for good (``await token.cancelled()`` on a token another process cancelled once never
  returned, in ~1,400 awaits on a loaded 2-core machine). The sleep is on the value judged.
- Polling ``is_cancelled()``: a latency or a CPU cost, whichever the period trades for the other.

Where the kernel has no ``futex_waitv`` (Linux < 5.16), each watch gets a thread of its own,
asleep on its token's word (or the epoch). It cannot be woken to leave without a lost-wake-up
race (the word is the token's, not ours to change), so it looks whether its watch was cancelled
every ``_LEAVE_CHECK`` seconds; a cancellation of its token still wakes it at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol

from procsup._token.arena import HINT, PULL, Arena
from procsup._token.futex import WAITV_MAX, futex_wait, futex_waitv, futex_wake

__all__ = ["PER_SHARD", "TokenWatch", "Watchable", "Watched", "awaiting"]

logger = logging.getLogger("procsup")

PER_SHARD = WAITV_MAX - 8  # tokens per thread: the control word and an epoch or so beside them
_LEAVE_CHECK = 0.5  # seconds a fallback thread may take to notice its watch was cancelled


class Watchable(Protocol):
    """What a watch reads of a ``CancellationToken``: this module cannot import that class, whose
    ``cancelled()`` is built on a watch (``awaiting()``)."""

    _arena: Arena
    _slot: int
    _live: int
    _words: memoryview
    _word: int

    @property
    def cause(self) -> str | None: ...


class Watched:
    """One token being watched; ``cancel()`` stops watching it (idempotent).

    A callback already under way when ``cancel()`` is called may still run; none starts later.
    """

    __slots__ = ("_drop", "callback", "token")

    def __init__(self, token: Watchable, callback: Callable[[str], None]) -> None:
        self.token = token
        self.callback = callback
        self._drop: Callable[[Watched], None] = _ignore

    def cancel(self) -> None:
        """Stop watching: no callback for this token starts after this returns."""
        self._drop(self)


def _ignore(watched: Watched) -> None:
    pass


def _address(token: Watchable) -> int:
    return token._arena.address + token._word * 4


def _state(token: Watchable, current: int) -> int:
    """What ``current``, a value of the token's word, says: 1 cancelled (or gone), 0 live, -1 PULL
    only (the arena must be asked)."""
    if current == token._live:
        return 0
    return -1 if current & ~PULL == token._live else 1


class _Shard:
    """Up to ``PER_SHARD`` tokens and the thread that sleeps on all of them at once.

    Invariants (under ``_lock``): ``_entries`` holds every watch neither fired nor cancelled;
    ``_control`` changes whenever an entry is added (or the shard closes, or, with ``on_idle``,
    loses its last entry), so a pass that read an older value does not sleep: every entry is
    among the words slept on (a dropped one may be too, until the next pass). Once ``_closing``
    is set, no entry is added and the thread is ending (or has ended).
    """

    def __init__(self, name: str, first: Watched, on_idle: Callable[[_Shard], None] | None) -> None:
        self._lock = threading.Lock()
        self._entries: set[Watched] = set()
        self._control = ctypes.c_uint32(0)
        self._closing = False
        self._on_idle = on_idle  # None: the thread runs until close(); else it ends when idle
        self.add(first)  # before the thread: an idle_exit shard never starts empty
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, watched: Watched) -> bool:
        """Add a watch; False if this shard's thread is ending (then nothing changed)."""
        token = watched.token
        token._words[token._word + HINT] = 1  # cancel() wakes only what was ever waited on
        with self._lock:
            if self._closing:
                return False
            watched._drop = self.drop
            self._entries.add(watched)
            self._kick()
        return True

    def drop(self, watched: Watched) -> None:
        # No kick while entries remain: the thread may keep the word in its set until its next
        # pass (any add or cancellation), where a wake for it finds no entry. Waking it for
        # every drop cost a thread switch at the end of every run.
        with self._lock:
            if watched in self._entries:
                self._entries.discard(watched)
                if self._on_idle is not None and not self._entries:
                    self._kick()  # the last one: the thread ends

    def close(self, timeout: float) -> bool:
        with self._lock:
            self._closing = True
            self._kick()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _kick(self) -> None:
        """Under the lock: make the thread look again."""
        self._control.value = (self._control.value + 1) & 0xFFFFFFFF
        futex_wake(ctypes.addressof(self._control))

    def _fire(self, watched: Watched) -> None:
        with self._lock:
            if watched not in self._entries:
                return  # cancelled meanwhile
            self._entries.discard(watched)
        try:
            watched.callback(watched.token.cause or "cancelled")
        except Exception:  # a broken callback must not end the watch of every other token
            logger.exception("procsup: a token watch callback raised")

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._entries and self._on_idle is not None:
                    self._closing = True
                if self._closing:
                    break
                entries = list(self._entries)
                control = self._control.value
            words = [(ctypes.addressof(self._control), control)]
            fired, pulled = [], []
            for watched in entries:
                token = watched.token
                current = token._words[token._word]
                state = _state(token, current)
                if state == -1 and token._arena.pulled(token._slot, token._live)[0]:
                    state = 1
                if state == 1:
                    fired.append(watched)
                    continue
                # Asleep while the word still reads what was judged, not what it reads by now: a
                # cancel() between the two looks (its wake sent before we sleep) would be lost.
                words.append((_address(token), current))
                if state == -1:
                    pulled.append(watched)
            if fired:
                for watched in fired:
                    self._fire(watched)
                continue
            arenas = {id(w.token._arena): w.token._arena for w in pulled}
            counted = []
            try:
                for arena in arenas.values():  # as wait_pulled: counted, then the epoch read
                    counted.append(arena)
                    words.append(arena.count_pull_waiter(1))
                if not any(w.token._arena.pulled(w.token._slot, w.token._live)[0] for w in pulled):
                    futex_waitv(words)
            finally:
                for arena in counted:
                    arena.count_pull_waiter(-1)
        if self._on_idle is not None:
            self._on_idle(self)


class _Lone:
    """The fallback without ``futex_waitv``: one thread for one watch."""

    def __init__(self, watched: Watched, name: str, on_end: Callable[[_Lone], None] | None) -> None:
        self._watched = watched
        self._left = False
        self._on_end = on_end
        watched._drop = self._leave
        watched.token._words[watched.token._word + HINT] = 1
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _leave(self, watched: Watched) -> None:
        self._left = True
        token = watched.token
        futex_wake(_address(token))  # a spurious wake: it sees _left and returns
        token._arena.wake_pulled()

    def _run(self) -> None:
        token = self._watched.token
        while not self._left:
            state = _state(token, token._words[token._word])
            if state == 0:
                # Bounded: the token's word cannot be changed to say "leave", so a wake sent
                # between our look at _left and this wait would be lost; a cancellation is not.
                futex_wait(_address(token), token._live, _LEAVE_CHECK)
            elif state == 1 or token._arena.wait_pulled(token._slot, token._live, None):
                if not self._left:
                    try:
                        self._watched.callback(token.cause or "cancelled")
                    except Exception:
                        logger.exception("procsup: a token watch callback raised")
                break
        if self._on_end is not None:
            self._on_end(self)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class TokenWatch:
    """Calls ``callback(cause)`` once a watched token is cancelled, from a thread of the watch.

    Callbacks run on the watch's threads: keep them short (hand the work to another thread).
    ``close()`` ends the threads; watches not fired by then never fire. With ``idle_exit``, a
    thread also ends as soon as it has nothing left to watch (the next ``watch()`` starts
    another): an idle watch holds no thread, and needs no ``close()``.
    """

    def __init__(self, name: str, *, multi: bool | None = None, idle_exit: bool = False) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._shards: list[_Shard] = []
        self._lones: list[_Lone] = []
        self._closed = False
        self._multi = _has_waitv() if multi is None else multi
        self._idle_exit = idle_exit

    def watch(self, token: Watchable, callback: Callable[[str], None]) -> Watched:
        """Watch ``token``: ``callback`` runs once it is cancelled (at once if it is already).

        Raises:
            RuntimeError: after ``close()``.
        """
        watched = Watched(token, callback)
        with self._lock:
            if self._closed:
                raise RuntimeError("this TokenWatch is closed")
            if not self._multi:
                self._lones = [lone for lone in self._lones if lone._thread.is_alive()]
                self._lones.append(_Lone(watched, self._name, self._ended_lone))
                return watched
            for shard in self._shards:
                if len(shard) < PER_SHARD and shard.add(watched):
                    return watched
            on_idle = self._ended_shard if self._idle_exit else None
            self._shards.append(_Shard(self._name, watched, on_idle))
        return watched

    def _ended_shard(self, shard: _Shard) -> None:
        with self._lock:
            if shard in self._shards:
                self._shards.remove(shard)

    def _ended_lone(self, lone: _Lone) -> None:
        if self._idle_exit:  # else close() joins it (and watch() prunes it)
            with self._lock:
                if lone in self._lones:
                    self._lones.remove(lone)

    def close(self, timeout: float) -> bool:
        """End the threads (a lone watch's once it is cancelled or fired); True once they have."""
        with self._lock:
            self._closed = True
            shards, self._shards = self._shards, []
            lones, self._lones = self._lones, []
        done = all([shard.close(timeout) for shard in shards])  # noqa: C419 - close every one
        for lone in lones:
            lone._watched.cancel()
        return all([lone.join(timeout) for lone in lones]) and done  # noqa: C419 - join every one

    def _forsake(self) -> None:
        """In a forked child: the threads are gone, and a lock may be held by one of them."""
        for shard in self._shards:
            for watched in list(shard._entries):
                watched._drop = _ignore
        for lone in self._lones:
            lone._watched._drop = _ignore


def _has_waitv() -> bool:
    word = ctypes.c_uint32(1)
    try:  # a mismatched value: returns at once where the syscall exists
        futex_waitv([(ctypes.addressof(word), 0)])
    except OSError:
        return False
    return True


_awaiting: TokenWatch | None = None
_awaiting_lock = threading.Lock()


def awaiting() -> TokenWatch:
    """The process's watch behind ``await token.cancelled()``, made on first use; also the
    watch of a restartable task's parent while it waits out a backoff
    (``procsup._supervision.lifecycle``).

    Its threads (``procsup-token-waiter``) end whenever nothing is watched, so a process that
    awaits nothing holds none, and no ``close()`` is ever due.
    """
    global _awaiting
    with _awaiting_lock:
        if _awaiting is None:
            _awaiting = TokenWatch("procsup-token-waiter", idle_exit=True)
        return _awaiting


def _forget_after_fork() -> None:
    # The watch's threads do not survive fork. A forked child awaits with a watch of its own;
    # an await pending in the parent is not carried over (its loop is the parent's to run).
    global _awaiting, _awaiting_lock
    inherited, _awaiting = _awaiting, None
    _awaiting_lock = threading.Lock()
    if inherited is not None:
        inherited._forsake()


os.register_at_fork(after_in_child=_forget_after_fork)
