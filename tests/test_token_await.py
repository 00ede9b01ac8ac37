"""``await token.cancelled()``: woken by a cancellation, and leaving no thread when aborted.

The awaits share the process's watch (``procsup._token.watch.awaiting()``); each test runs with
its ``futex_waitv`` shards and with the fallback for kernels without it (a thread per await).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

import procsup._token.watch as watch_module
from procsup import CancellationToken
from procsup._token.futex import futex_waitv
from procsup._token.watch import PER_SHARD, TokenWatch, _has_waitv
from tests import token_tasks

DEADLINE = 10.0
NAME = "procsup-token-waiter"

Pipe = Callable[[], tuple[Connection, Connection]]


@pytest.fixture(params=["waitv", "lone"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The process's watch for awaits, made afresh with futex_waitv shards or a thread per await."""
    if request.param == "waitv" and not _has_waitv():
        pytest.skip("this kernel has no futex_waitv (Linux < 5.16)")
    fresh = TokenWatch(NAME, multi=request.param == "waitv", idle_exit=True)
    monkeypatch.setattr(watch_module, "_awaiting", fresh)
    return str(request.param)


def waiter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == NAME]


def waiters_left() -> int:
    """How many waiter threads are still alive after a bounded join of each."""
    for thread in waiter_threads():
        thread.join(DEADLINE)
    return len(waiter_threads())


async def aborted(token: CancellationToken, how: str) -> None:
    """Await ``token.cancelled()`` and abort the await once it is under way."""
    if how == "cancel":
        waiter = asyncio.ensure_future(token.cancelled())
        await asyncio.sleep(0)  # under way: its watch is made
        waiter.cancel()
        [result] = await asyncio.gather(waiter, return_exceptions=True)
        assert isinstance(result, asyncio.CancelledError)
    elif how == "wait_for":
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(token.cancelled(), 0.0001)
    else:  # run_until_cancelled: the work finishes first, and the watcher is cancelled
        assert await token.run_until_cancelled(asyncio.sleep(0, "done")) == "done"


@pytest.mark.parametrize("how", ["cancel", "wait_for", "run_until_cancelled"])
def test_an_aborted_await_leaves_no_thread(mode: str, how: str) -> None:
    """Test that awaits aborted while the token stays live leave no waiter thread, on fresh tokens
    and on one token awaited again and again (as a loop of run_until_cancelled does)."""
    root = CancellationToken()
    rounds = 200 if mode == "waitv" else 20

    async def scenario() -> None:
        for _ in range(rounds):
            await aborted(root.child_token(), how)
            await aborted(root, how)

    asyncio.run(scenario())
    assert waiters_left() == 0
    assert not root.is_cancelled()


@pytest.mark.parametrize("mode", ["waitv"], indirect=True)  # the fallback polls for an abort
def test_an_abort_at_the_last_moment_is_not_lost(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test the race that once leaked a thread per abort: the waiter thread has made its last
    look at the token (live) but not yet gone to sleep when the await is aborted. Here it is held
    at exactly that point until the abort is done."""
    reached, proceed = threading.Semaphore(0), threading.Semaphore(0)

    def held(words: list[tuple[int, int]]) -> int:
        reached.release()
        assert proceed.acquire(timeout=DEADLINE)
        return futex_waitv(words)

    monkeypatch.setattr(watch_module, "futex_waitv", held)
    root = CancellationToken()

    async def scenario() -> None:
        for _ in range(20):
            waiter = asyncio.ensure_future(root.child_token().cancelled())
            await asyncio.sleep(0)
            assert reached.acquire(timeout=DEADLINE)  # the thread is between look and sleep
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            proceed.release()
            for thread in waiter_threads():  # one at a time: each must end on its own
                thread.join(DEADLINE)
            assert waiter_threads() == []

    asyncio.run(scenario())


def test_a_cancellation_wakes_every_awaiter(mode: str) -> None:
    """Test that one cancellation wakes many concurrent awaits (several on one token, one of them
    aborted first), from a few threads with futex_waitv, none left once they are woken."""
    root = CancellationToken()
    many = PER_SHARD * 2 + 5 if mode == "waitv" else 20
    tokens = [root.child_token() for _ in range(many)] + [root] * 5

    async def scenario() -> None:
        waiters = [asyncio.ensure_future(token.cancelled()) for token in tokens]
        await asyncio.sleep(0)  # every await is under way
        if mode == "waitv":
            assert len(waiter_threads()) == math.ceil(len(tokens) / PER_SHARD)
        else:
            assert len(waiter_threads()) == len(tokens)
        waiters[-1].cancel()
        await asyncio.gather(waiters[-1], return_exceptions=True)
        assert not any(waiter.done() for waiter in waiters[:-1])
        threading.Thread(target=root.cancel, args=("all of them",)).start()
        await asyncio.wait_for(asyncio.gather(*waiters[:-1]), DEADLINE)

    asyncio.run(scenario())
    assert waiters_left() == 0
    assert {token.cause for token in tokens} == {"all of them"}


def test_a_token_cancelled_already_returns_at_once(mode: str) -> None:
    """Test that awaiting a cancelled token returns without any thread."""
    token = CancellationToken()
    token.cancel()

    async def scenario() -> None:
        await asyncio.wait_for(token.cancelled(), DEADLINE)
        assert waiter_threads() == []

    asyncio.run(scenario())


def test_a_child_process_awaits_with_a_watch_of_its_own(start_method: str, pipe: Pipe) -> None:
    """Test that a child started while this process has an await under way (its waiter thread,
    which a forked child does not inherit) can abort one await and be woken from another by a
    cancel made here, and leaves no waiter thread."""
    token = CancellationToken()
    ready = CancellationToken()
    reader, writer = pipe()
    ctx: Any = mp.get_context(start_method)

    async def scenario() -> None:
        pending = asyncio.ensure_future(CancellationToken().cancelled())
        await asyncio.sleep(0)
        assert len(waiter_threads()) == 1  # there to be forked without
        proc = ctx.Process(target=token_tasks.await_in_child, args=(token, ready, writer))
        proc.start()
        try:
            await asyncio.wait_for(ready.cancelled(), DEADLINE)
            token.cancel("from the parent")
            assert reader.poll(DEADLINE)
            assert reader.recv() == ("from the parent", 0)
        finally:
            proc.join(DEADLINE)
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        assert proc.exitcode == 0

    asyncio.run(scenario())
    assert waiters_left() == 0
