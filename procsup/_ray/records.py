"""The driver's records: one per agent (``AgentLink``), one per run (``RayRun``, a ``runtime.Run``).

Both are written by the backend (``procsup._ray.backend``) under its lock or on its loop; a run's
``facts()`` is the one call that reaches out, to its node, from whatever thread asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from procsup._ray.channel import Channel
from procsup._ray.messages import NodeInfo
from procsup._supervision.runtime import Facts, RunSpec
from procsup._token.watch import Watched

__all__ = ["FACTS_DEADLINE", "AgentLink", "RayRun", "facts_of"]

FACTS_DEADLINE = 2.0  # seconds tasks() waits for a node's answer before showing None


class AgentLink:
    """The driver's view of one agent (one incarnation: a lost agent is replaced by a new one).

    Invariants: ``info`` is None until the agent answered ``ready()``; ``lost`` None until its
    death (or our giving up on it) was seen, then why; ``killed`` the seconds a stop waited
    before we killed it, or None; ``runs`` every run started on it whose outcome is not out;
    ``stops`` (the loop's) each stop sent to it whose ``StopDone`` has not come; ``channel`` its
    door's connections once it answered (None if it has no door), closed once it is lost.
    """

    def __init__(self, key: str, node_id: str, actor: Any) -> None:
        self.key = key
        self.node_id = node_id
        self.actor = actor
        self.info: NodeInfo | None = None
        self.lost: str | None = None
        self.killed: float | None = None
        self.runs: set[RayRun] = set()
        self.stops: dict[str, asyncio.Future[list[str]]] = {}  # on the loop: awaiting StopDone
        self.ready_lock = threading.Lock()
        self.channel: Channel | None = None

    @property
    def node(self) -> NodeInfo:
        """Where it runs (its node id alone until it answered)."""
        return self.info or NodeInfo(self.node_id, "?", "?", 0)


class RayRun:
    """One run on a node: a ``runtime.Run``.

    Invariants: ``future`` is RUNNING until the outcome is published, then done, never cancelled;
    for a failure that cancels the parent, that is cancelled first. ``pid`` is set and
    ``started`` True once the agent answered the start: until then, a loss of the agent is for
    ``start()`` to raise (or retry), not a crash to publish. ``upward`` once the task cancelled
    its own token (the node knows: not relayed back down). ``relayed`` is the hub call that
    carries the token's cancellation to the node, None until sent. ``watched`` watches the token
    until the outcome is out. ``published`` is set once, under the backend's lock, by whoever
    publishes the outcome (or by the start that failed): nobody else does. ``stop_reason``/
    ``limit_reason`` as for a local run
    (``monitor.TaskRecord``).
    """

    def __init__(self, spec: RunSpec, run_id: str, agent: AgentLink, wants: dict[str, float]):
        self.spec = spec
        self.run_id = run_id
        self.agent = agent
        self.wants = wants
        self.pid = 0
        self.started = False  # the agent answered Started: from now on its outcome is ours
        self.published = False  # its outcome is out (or its start failed): set once, locked
        self.exitcode: int | None = None
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # so asyncio.wrap_future can never cancel it
        self.stop_reason: str | None = None
        self.limit_reason: str | None = None
        self.signal_at = math.inf  # when the node's ladder signals it, as far as we know
        self.upward = False
        self.relayed: Any = None
        self.watched: Watched | None = None  # its token, watched until the outcome is out
        self.prefetched: Facts | None = None  # read for tasks(), all nodes at once

    @property
    def node_id(self) -> str:
        """The Ray node (hex id) the run's process is on."""
        return self.agent.node_id

    @property
    def signalled(self) -> bool:
        """True once a ladder has (by now) signalled it on its node."""
        return time.monotonic() >= self.signal_at

    def facts(self) -> Facts:
        """The process's pid, RSS and CPU use now, asked of its node (None where unknown)."""
        prefetched, self.prefetched = self.prefetched, None
        if prefetched is not None:
            return prefetched
        if self.future.done() or self.agent.lost is not None:
            return Facts(self.pid, None, None)
        try:
            [answer] = ray.get(self.agent.actor.facts.remote([self.run_id]), timeout=FACTS_DEADLINE)
        except (RayError, GetTimeoutError):
            return Facts(self.pid, None, None)
        return facts_of(self, answer)


def facts_of(run: RayRun, answer: tuple[int | None, int | None, float | None]) -> Facts:
    """A node's answer about ``run``'s process, as ``Facts``."""
    pid, rss, cpu = answer
    return Facts(pid or run.pid, rss, cpu)
