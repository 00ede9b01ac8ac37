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
    Watched.cancel() ─▶ entry dropped (its word is left out of the next pass)

A cancellation wakes the watcher exactly as it wakes a thread in ``CancellationToken.wait()``:
``cancel()`` wakes every newly cancelled node whose ``hint`` is set (``procsup._token.arena``),
and the watcher sets it before its first look, its futex syscall ordering that store before the
kernel's load of the word.

Things that don't work
----------------------
- A thread per token blocked in ``wait()`` (what ``await token.cancelled()`` does): a supervisor
  of a thousand remote tasks would hold a thousand threads, and every start and end of one pays
  for a thread's creation and wake-up (about a millisecond of a loaded 2-core machine, measured
  on a Ray start-to-result).
- ``futex_wait`` on one word after another: a cancellation of any other token waits for the one
  being slept on.
- Polling ``is_cancelled()``: a latency or a CPU cost, whichever the period trades for the other.

Where the kernel has no ``futex_waitv`` (Linux < 5.16), each watch gets a thread of its own,
asleep on its token's word (or the epoch). It cannot be woken to leave without a lost-wake-up
race (the word is the token's, not ours to change), so it looks whether its watch was cancelled
every ``_LEAVE_CHECK`` seconds; a cancellation of its token still wakes it at once.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

from procsup._token.arena import HINT, PULL
from procsup._token.futex import WAITV_MAX, futex_wait, futex_waitv, futex_wake
from procsup._token.token import CancellationToken

__all__ = ["PER_SHARD", "TokenWatch", "Watched"]

logger = logging.getLogger("procsup")

PER_SHARD = WAITV_MAX - 8  # tokens per thread: the control word and an epoch or so beside them
_LEAVE_CHECK = 0.5  # seconds a fallback thread may take to notice its watch was cancelled


class Watched:
    """One token being watched; ``cancel()`` stops watching it (idempotent).

    A callback already under way when ``cancel()`` is called may still run; none starts later.
    """

    __slots__ = ("_drop", "callback", "token")

    def __init__(self, token: CancellationToken, callback: Callable[[str], None]) -> None:
        self.token = token
        self.callback = callback
        self._drop: Callable[[Watched], None] = lambda watched: None

    def cancel(self) -> None:
        """Stop watching: no callback for this token starts after this returns."""
        self._drop(self)


def _address(token: CancellationToken) -> int:
    return token._arena.address + token._word * 4


def _state(token: CancellationToken) -> int:
    """1 cancelled (or gone), 0 live, -1 PULL only: the arena must be asked."""
    current = token._words[token._word]
    if current == token._live:
        return 0
    return -1 if current & ~PULL == token._live else 1


class _Shard:
    """Up to ``PER_SHARD`` tokens and the thread that sleeps on all of them at once.

    Invariants (under ``_lock``): ``_entries`` holds every watch neither fired nor cancelled;
    ``_control`` changes whenever an entry is added (or the shard closes), so a pass that read an
    older value does not sleep: every entry is among the words slept on (a dropped one may be
    too, until the next pass).
    """

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._entries: set[Watched] = set()
        self._control = ctypes.c_uint32(0)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, watched: Watched) -> None:
        token = watched.token
        token._words[token._word + HINT] = 1  # cancel() wakes only what was ever waited on
        watched._drop = self.drop
        with self._lock:
            self._entries.add(watched)
            self._kick()

    def drop(self, watched: Watched) -> None:
        # No kick: the thread may keep the word in its set until its next pass (any add or
        # cancellation), where a wake for it finds no entry. Waking it for every drop cost a
        # thread switch at the end of every run.
        with self._lock:
            self._entries.discard(watched)

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
                if self._closing:
                    return
                entries = list(self._entries)
                control = self._control.value
            words = [(ctypes.addressof(self._control), control)]
            fired, pulled = [], []
            for watched in entries:
                token = watched.token
                state = _state(token)
                if state == -1 and token._arena.pulled(token._slot, token._live)[0]:
                    state = 1
                if state == 1:
                    fired.append(watched)
                    continue
                words.append((_address(token), token._words[token._word]))
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


class _Lone:
    """The fallback without ``futex_waitv``: one thread for one watch."""

    def __init__(self, watched: Watched, name: str) -> None:
        self._watched = watched
        self._left = False
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
            state = _state(token)
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
                return

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class TokenWatch:
    """Calls ``callback(cause)`` once a watched token is cancelled, from a thread of the watch.

    Callbacks run on the watch's threads: keep them short (hand the work to another thread).
    ``close()`` ends the threads; watches not fired by then never fire.
    """

    def __init__(self, name: str, *, multi: bool | None = None) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._shards: list[_Shard] = []
        self._lones: list[_Lone] = []
        self._closed = False
        self._multi = _has_waitv() if multi is None else multi

    def watch(self, token: CancellationToken, callback: Callable[[str], None]) -> Watched:
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
                self._lones.append(_Lone(watched, self._name))
                return watched
            shard = next((s for s in self._shards if len(s) < PER_SHARD), None)
            if shard is None:
                shard = _Shard(self._name)
                self._shards.append(shard)
            shard.add(watched)
        return watched

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


def _has_waitv() -> bool:
    word = ctypes.c_uint32(1)
    try:  # a mismatched value: returns at once where the syscall exists
        futex_waitv([(ctypes.addressof(word), 0)])
    except OSError:
        return False
    return True
