"""The token hub: one async Ray actor per ``RaySupervisor``, relaying cancellations both ways.

::

    driver (procsup._ray.backend)     TokenHub (on the driver's node)     agents (one per node)
    ─────────────────────────────     ───────────────────────────────     ─────────────────────
    a run's token cancelled ────────▶ cancel(agent, [(run, cause)]) ──┐
      (an ancestor, handle.cancel,      queue[agent] += seq             │ agent_poll(agent, acked)
       a sibling's failure...)          returns once the agent acked ◀─┘  long-polls; gets the
                                                                          batch, cancels those
                                                                          tokens, polls again
                                                                          with acked = last seq
    driver_poll(acked) long-polls ◀── inbox += (run, cause) ◀───────── report(agent, [...]):
      the run's token is cancelled                                       the task cancelled its
      in the driver too                                                  own token
    drop(agent): a lost agent's queue closes; close(): every poll returns None

Its lifetime is the driver's: Ray owns it through the driver, so a driver that dies takes the hub
with it. An agent whose poll fails (the hub is gone) or returns None (it was dropped, or the
supervisor is closing) cancels every task it runs and stops them (``procsup._ray.agent``): that is
the fail-safe behind "nothing outlives the driver", beside Ray's own killing of a dead owner's
actors.

Invariants: a queue's ``entries`` hold, in ``seq`` order, every cancellation its agent has not
acknowledged; ``waiters`` every ``cancel()`` call waiting for an acknowledgement, resolved (True)
once ``acked`` reaches its ``seq``, or (False) when the queue is dropped or the hub closes. Each
agent polls one call at a time, and so does the driver.

Things that don't work
----------------------
- Sending cancellations to agents as plain actor calls: a call issued after the agent's process
  died is lost with nothing to say so, and the agent would have nothing to watch for its driver.
  The long poll is both the channel and the agent's proof that its driver lives.
- A poll without a bound: an agent stuck on a hub that hangs (not dies) would never know. Polls
  return empty after ``POLL_SECONDS`` and are made again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from procsup._ray.messages import Cancellation

__all__ = ["POLL_SECONDS", "TokenHub"]

POLL_SECONDS = 30.0  # a long poll returns empty after this long, and is made again


@dataclass
class _Queue:
    entries: list[tuple[int, str, str]] = field(default_factory=list)
    seq: int = 0
    acked: int = 0
    waiters: list[tuple[int, asyncio.Future[bool]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False

    def ack(self, acked: int) -> None:
        self.acked = max(self.acked, acked)
        self.entries = [entry for entry in self.entries if entry[0] > self.acked]
        still = []
        for seq, waiter in self.waiters:
            if seq <= self.acked:
                if not waiter.done():
                    waiter.set_result(True)
            else:
                still.append((seq, waiter))
        self.waiters = still

    def close(self) -> None:
        self.gone = True
        for _, waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(False)
        self.waiters = []
        self.entries = []
        self.changed.set()


class TokenHub:
    """The relay (see the module docstring); made by the driver with ``ray.remote``."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._inbox: list[tuple[int, str, str]] = []
        self._inbox_seq = 0
        self._inbox_changed = asyncio.Event()
        self._closed = False

    def _queue(self, agent: str) -> _Queue:
        queue = self._queues.get(agent)
        if queue is None:
            queue = self._queues[agent] = _Queue()
            if self._closed:
                queue.close()
        return queue

    async def ping(self) -> bool:
        """True: the hub is up (the driver waits for this before making agents)."""
        return True

    async def cancel(self, agent: str, items: list[Cancellation]) -> bool:
        """Queue cancellations for ``agent``; return True once it has applied them, False if it
        was dropped (or the hub closed) first."""
        queue = self._queue(agent)
        if queue.gone:
            return False
        for run_id, cause in items:
            queue.seq += 1
            queue.entries.append((queue.seq, run_id, cause))
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue.waiters.append((queue.seq, waiter))
        queue.changed.set()
        return await waiter

    async def agent_poll(self, agent: str, acked: int) -> list[tuple[int, str, str]] | None:
        """The cancellations after ``acked`` for ``agent``, waiting up to ``POLL_SECONDS`` for
        one; None once the agent is dropped or the hub closes (the agent then stops its runs)."""
        queue = self._queue(agent)
        queue.ack(acked)
        if not queue.entries and not queue.gone:
            queue.changed.clear()
            try:
                await asyncio.wait_for(queue.changed.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
        if queue.gone:
            return None
        return list(queue.entries)

    async def report(self, agent: str, items: list[Cancellation]) -> None:
        """Tasks under ``agent`` cancelled their own tokens: tell the driver."""
        if self._queue(agent).gone:
            return
        for run_id, cause in items:
            self._inbox_seq += 1
            self._inbox.append((self._inbox_seq, run_id, cause))
        self._inbox_changed.set()

    async def driver_poll(self, acked: int) -> list[tuple[int, str, str]] | None:
        """The reports after ``acked``, waiting up to ``POLL_SECONDS`` for one; None once closed."""
        self._inbox = [entry for entry in self._inbox if entry[0] > acked]
        if not self._inbox and not self._closed:
            self._inbox_changed.clear()
            try:
                await asyncio.wait_for(self._inbox_changed.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
        if self._closed:
            return None
        return list(self._inbox)

    async def drop(self, agent: str) -> None:
        """Forget ``agent`` (lost, or let go): its waiters return False, its poll None."""
        self._queue(agent).close()

    async def close(self) -> None:
        """Every poll returns None from now on, every waiter False."""
        self._closed = True
        for queue in self._queues.values():
            queue.close()
        self._inbox_changed.set()
