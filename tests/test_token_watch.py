"""TokenWatch: one thread notices the cancellation of any of many tokens (procsup._token.watch).

Each test runs with ``futex_waitv`` (one thread per shard of tokens) and with the fallback for
kernels without it (one thread per token); every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from typing import cast

import pytest

from procsup import CancellationToken
from procsup._token.arena import Arena
from procsup._token.watch import PER_SHARD, TokenWatch, _has_waitv

DEADLINE = 30.0


@pytest.fixture(params=["waitv", "lone"])
def watch(request: pytest.FixtureRequest) -> Iterator[TokenWatch]:
    """A watch with futex_waitv shards, or with a thread per token; closed afterwards."""
    if request.param == "waitv" and not _has_waitv():
        pytest.skip("this kernel has no futex_waitv (Linux < 5.16)")
    watcher = TokenWatch("test-token-watch", multi=request.param == "waitv")
    yield watcher
    assert watcher.close(DEADLINE)


class Seen:
    """Records callbacks; ``wait`` for a count with a deadline."""

    def __init__(self) -> None:
        self.causes: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, cause: str) -> None:
        with self._cond:
            self.causes.append(cause)
            self._cond.notify_all()

    def wait(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.causes) >= count, DEADLINE)


def test_a_cancellation_calls_back_once_with_its_cause(watch: TokenWatch) -> None:
    """Test that cancelling a watched token (or its ancestor) calls back once, with the cause, and
    that a token cancelled already calls back at once."""
    root = CancellationToken()
    child = root.child_token()
    seen = Seen()
    watch.watch(child, seen)
    root.cancel("the root went")
    assert seen.wait(1)
    child.cancel("again")
    done = CancellationToken()
    done.cancel("before the watch")
    watch.watch(done, seen)
    assert seen.wait(2)
    assert seen.causes == ["the root went", "before the watch"]


def test_a_cancelled_watch_never_calls_back(watch: TokenWatch) -> None:
    """Test that a watch cancelled before its token is gives no callback, while another token
    watched beside it still does (the order of the two callbacks proves the first was seen)."""
    quiet, loud = CancellationToken(), CancellationToken()
    seen = Seen()
    watch.watch(quiet, seen).cancel()
    watch.watch(loud, seen)
    quiet.cancel("unwatched")
    loud.cancel("watched")
    assert seen.wait(1)
    assert seen.causes == ["watched"]


def test_many_tokens_beyond_one_shard(watch: TokenWatch) -> None:
    """Test that more tokens than one futex_waitv takes are all watched (several shards)."""
    root = CancellationToken()
    tokens = [root.child_token() for _ in range(PER_SHARD * 2 + 5)]
    seen = Seen()
    for token in tokens:
        watch.watch(token, seen)
    tokens[-1].cancel("the last one")
    assert seen.wait(1)
    root.cancel("all of them")
    assert seen.wait(len(tokens))
    assert seen.causes.count("all of them") == len(tokens) - 1


def _cancel_in_child(token: CancellationToken) -> None:
    token.cancel("from another process")


def test_a_cancellation_in_another_process_is_seen(watch: TokenWatch) -> None:
    """Test that a token cancelled by another process (shared memory) calls back here."""
    token = CancellationToken()
    seen = Seen()
    watch.watch(token, seen)
    child = multiprocessing.get_context("fork").Process(target=_cancel_in_child, args=(token,))
    child.start()
    child.join(DEADLINE)
    assert seen.wait(1)
    assert seen.causes == ["from another process"]


def test_a_cancel_filed_as_a_request_is_seen(watch: TokenWatch) -> None:
    """Test the PULL path: a cancel() that cannot have the arena lock (held here, as by a stopped
    process) files a request, and the watch sees it while the lock is still held."""
    token = CancellationToken()
    seen = Seen()
    watch.watch(token, seen)
    arena = Arena.default()
    canceller = threading.Thread(target=token.cancel, args=("filed as a request",))
    assert arena.lock()
    try:
        canceller.start()
        assert seen.wait(1)
    finally:
        arena.unlock()
        canceller.join(DEADLINE)
    assert seen.causes == ["filed as a request"]


class _FirstLookCancels:
    """A token's words, which cancel the token right after the first look at its word: on the
    watch's own thread, after it judged the token live and before it can go to sleep, so the
    cancel's wake finds nobody asleep."""

    def __init__(self, token: CancellationToken) -> None:
        self._token = token
        self._looked = False

    def __getitem__(self, index: int) -> int:
        value = self._token._words[index]
        if index == self._token._word and not self._looked:
            self._looked = True
            self._token.cancel("between two looks")
        return value

    def __setitem__(self, index: int, value: int) -> None:
        self._token._words[index] = value


class _CancelledBetweenLooks:
    """``token`` as a watch reads it, through ``_FirstLookCancels``."""

    def __init__(self, token: CancellationToken) -> None:
        self._token = token
        self._arena, self._slot, self._live = token._arena, token._slot, token._live
        self._word = token._word
        self._words = cast(memoryview, _FirstLookCancels(token))

    @property
    def cause(self) -> str | None:
        return self._token.cause


def test_a_cancel_between_the_look_and_the_sleep_is_seen(watch: TokenWatch) -> None:
    """Test that a token cancelled after the watch judged it live, its wake sent before the watch
    sleeps, still calls back: the sleep is on the value judged, which no longer matches."""
    token = CancellationToken()
    seen = Seen()
    watch.watch(_CancelledBetweenLooks(token), seen)
    assert seen.wait(1)
    assert seen.causes == ["between two looks"]


def test_close_ends_every_thread(watch: TokenWatch) -> None:
    """Test that close() ends the watch's threads, watches pending or not, and refuses more."""
    pending = CancellationToken()
    watch.watch(pending, Seen())
    assert watch.close(DEADLINE)
    assert not [t for t in threading.enumerate() if t.name == "test-token-watch"]
    with pytest.raises(RuntimeError, match="closed"):
        watch.watch(pending, Seen())
