"""Asyncio helpers: blocking supervisor calls run off the event loop, never on it.

asyncio (ssl with it: ~5 MB of the zygote's RSS) is imported when an async API is first used,
never by ``import procsup``: every task forked from the zygote would pay for its pages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncio

__all__ = ["off_loop"]


class _Abandonable(Protocol):
    def cancel(self) -> None: ...

    def detach(self) -> None: ...


H = TypeVar("H", bound=_Abandonable)


async def off_loop(start: Callable[[], H]) -> H:
    """Run ``start()`` (which returns a handle) in the loop's default executor.

    If the awaiting coroutine is cancelled, the start still completes, in its thread; the handle
    nobody will receive is then cancelled and detached, so it is neither leaked nor reported as
    dropped.
    """
    import asyncio

    started = asyncio.get_running_loop().run_in_executor(None, start)
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        started.add_done_callback(_abandon)
        raise


def _abandon(started: asyncio.Future[Any]) -> None:
    if not started.cancelled() and started.exception() is None:
        handle = started.result()
        handle.cancel()
        handle.detach()
