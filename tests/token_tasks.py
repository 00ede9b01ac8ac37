"""Child-process bodies for the token tests (importable, so they pickle under spawn/forkserver)."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
from typing import Any

from procsup import CancellationToken

DEADLINE = 10.0


def report_cancellation(token: CancellationToken, ready: CancellationToken, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Say we are ready, wait for the parent's cancel, report what we saw."""
    before = token.is_cancelled()
    ready.cancel()
    woke = token.wait(DEADLINE)
    out.put((before, woke, token.is_cancelled(), token.cause))


def cancel_with(token: CancellationToken, reason: str) -> None:
    token.cancel(reason)


def nested(token: CancellationToken, ctx_name: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Create a token here, hand it to our own child, and check cancellation both ways."""
    ctx: Any = mp.get_context(ctx_name)
    mine = token.child_token()
    grandchild_sees = ctx.Queue()
    ready = CancellationToken()
    proc = ctx.Process(target=report_cancellation, args=(mine, ready, grandchild_sees))
    proc.start()
    ready.wait(DEADLINE)
    # The grandchild is waiting on `mine`; the top-level parent cancels `token`, our parent.
    out.put("waiting")
    result = grandchild_sees.get(timeout=DEADLINE)
    proc.join(DEADLINE)
    # And the other direction: a grandchild cancels a token we created.
    upward = CancellationToken()
    proc = ctx.Process(target=cancel_with, args=(upward, "from grandchild"))
    proc.start()
    proc.join(DEADLINE)
    out.put((result, upward.wait(DEADLINE), upward.cause))


def spin_is_cancelled(token: CancellationToken, ready: CancellationToken) -> None:
    ready.cancel()
    while not token.is_cancelled():
        pass


def block_in_wait(token: CancellationToken, ready: CancellationToken) -> None:
    ready.cancel()
    token.wait()


def loop_short_waits(token: CancellationToken, ready: CancellationToken) -> None:
    ready.cancel()
    while not token.wait(0.0001):
        pass


def loop_cancel(token: CancellationToken, ready: CancellationToken) -> None:
    """Spend nearly all the time inside cancel() and child_token(), holding the arena lock."""
    ready.cancel()
    while True:
        child = token.child_token()
        child.child_token().cancel("inner")
        child.cancel("churn")
        _ = child.cause


def race_cancel(token: CancellationToken, start: CancellationToken, reason: str) -> None:
    start.wait(DEADLINE)
    token.cancel(reason)


def ten_thousand_under_ulimit() -> None:
    """Run in a fresh interpreter: 10,000 live tokens in one tree with 1,024 fds at most."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    root = CancellationToken()
    level1 = [root.child_token() for _ in range(99)]
    leaves = [parent.child_token() for parent in level1 for _ in range(100)]
    tokens = [root, *level1, *leaves]
    assert len(tokens) == 10_000
    assert not any(t.is_cancelled() for t in tokens)
    ctx: Any = mp.get_context("spawn")
    proc = ctx.Process(target=cancel_with, args=(root, "root"))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert all(t.is_cancelled() for t in tokens)
    assert {t.cause for t in tokens} == {"root"}
    assert len(os.listdir("/proc/self/fd")) < 64
    print("ok")


if __name__ == "__main__":
    globals()[sys.argv[1]]()


def churn(token: CancellationToken, ready: CancellationToken) -> None:
    """Take the arena lock as often as we can, forever: make, cancel and drop tokens below ours."""
    ready.cancel()
    while True:
        child = token.child_token()
        grandchild = child.child_token()
        child.cancel("churned")
        del grandchild, child


def report_wakes(tokens: list[CancellationToken], ready: CancellationToken, out: Any) -> None:
    """Wait on each token in turn; send its index, whether it woke, and its cause."""
    ready.cancel()
    for index, token in enumerate(tokens):
        woke = token.wait(DEADLINE)
        out.send((index, woke, token.is_cancelled(), token.cause))


def fail_once(token: CancellationToken, go: CancellationToken, marker: str) -> str:
    """First run: wait for ``go``, then raise. Every later run (``marker`` exists): return."""
    if os.path.exists(marker):
        return "second run"
    with open(marker, "w"):
        pass
    go.wait(DEADLINE)
    raise RuntimeError("first run")


def hold_the_lock(conn: Any) -> None:
    """Hold this process family's arena lock from "held" until told "go"."""
    from procsup._token.arena import Arena

    arena = Arena.default()
    arena.lock()
    conn.send("held")
    conn.poll(DEADLINE)
    arena.unlock()


def await_in_child(token: CancellationToken, ready: CancellationToken, out: Any) -> None:
    """Abort one ``await cancelled()``, then await ``token``; send its cause and how many waiter
    threads are left once each had a bounded join."""
    import asyncio
    import threading

    async def main() -> None:
        unawaited = CancellationToken()
        waiter = asyncio.ensure_future(unawaited.cancelled())
        await asyncio.sleep(0)  # its watch is made
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        waiter = asyncio.ensure_future(token.cancelled())
        await asyncio.sleep(0)
        ready.cancel()
        await asyncio.wait_for(waiter, DEADLINE)

    asyncio.run(main())
    for thread in threading.enumerate():
        if thread.name == "procsup-token-waiter":
            thread.join(DEADLINE)
    left = [t for t in threading.enumerate() if t.name == "procsup-token-waiter"]
    out.send((token.cause, len(left)))
