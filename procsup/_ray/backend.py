"""The Ray backend (the driver's side): runs are processes under agents on a Ray cluster's nodes.

::

    Lifecycle (driver) ─ start(RunSpec) ─▶ RayBackend.start: place (procsup._ray.placement), the
                                           node's agent (made on first use, pinned to the node)
                                           StartRequest by the agent's door, on this thread
                                           (procsup._ray.channel); if that fails: the same
                                           request by Ray, agent.start (the agent answers a
                                           second copy with the first one's answer)
                                           ─▶ Started(pid) ─▶ RayRun
                                           Started(pid, outcome): it ended already (a quick
                                           task): a value is published here and now, an
                                           error on the loop
    "procsup-ray" loop ◀─ agent.outcomes() long poll, one per agent: decode each outcome
                                           (procsup._ray.outcome); a failure cancels the
                                           parent, waits (bounded) for every node to have
                                           applied what that cancelled, THEN publishes
                       ◀─ ActorDiedError on that poll: the agent or its node is lost
                                           ─▶ TaskCrashedError naming the node
                       ◀─ TokenWatch: a run's token cancelled ─▶ hub.cancel ─▶ its agent
                       ◀─ hub.driver_poll: a task cancelled its own token ─▶ cancel it here
    stop(runs, grace) ── cancel here ─▶ agent.stop: the ladder on the node; no answer within
                                           the grace period ─▶ ray.kill(agent); its StopDone
                                           (what outlived SIGKILL) on the outcomes poll
    call_later ─────────▶ "procsup-ray-timers" (procsup._ray.threads)
    close(), join() ────▶ agents shut down (their zygotes exit), ray.kill, the hub closes

Every run has a token in the driver (``RunSpec.token``, made by the lifecycle, a child of the
driver's tree) and one on its node, made by the agent; the hub keeps them in step: a cancellation
of the driver's reaches the node's, and the task cancelling its own reaches the driver's.

Things that don't work
----------------------
- Publishing an outcome from Ray's callback thread: see ``procsup._ray.threads``.
- Answering a start at once and sending its outcome later, always: for a task that ends in a
  millisecond or two, that second message (the agent's reply to the poll, the driver's loop
  waking, then the joining thread) was half of start-to-result (6.1 ms, against 1.2 ms for a warm
  actor's round trip). The agent answers a quick task's start with its outcome instead
  (``procsup._ray.agent``), and the thread that started it publishes a value itself.
- Tokens in ``args``: a token is a node of shared memory on one machine and crosses into a
  process only as it starts there (``procsup._token.token``); a token of the driver's tree cannot
  be mapped on another node. The task's own token (its first argument) is the bridge; a task that
  needs more makes children of it. ``start()`` refuses a token in ``args`` with a TypeError.
- Waiting for a node to apply a cancellation inside ``cancel()``: tokens must never block. The
  relay is asynchronous; only a failure's publication waits (``_FLUSH_DEADLINE`` at most) for
  the other nodes to have applied the parent's cancellation, so that ``join()`` raising means
  the siblings everywhere see it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from procsup._os.tree import Ladder
from procsup._outcome.errors import CriticalTaskError, TaskCrashedError
from procsup._process.reduction import by_value, dumps_by_value
from procsup._ray.agent import CALLS, GROUPS, Agent
from procsup._ray.channel import Channel, ChannelError
from procsup._ray.hub import TokenHub
from procsup._ray.messages import (
    NodeInfo,
    Outcome,
    Ready,
    Refused,
    Started,
    StartRequest,
    StopDone,
    StopRequest,
)
from procsup._ray.options import demand, refuse_tokens
from procsup._ray.outcome import decode, killed, lost, ray_reason
from procsup._ray.placement import Placement
from procsup._ray.records import FACTS_DEADLINE, AgentLink, RayRun, facts_of
from procsup._ray.threads import LoopThread, TimerThread
from procsup._supervision.runtime import Run, RunSpec
from procsup._supervision.timers import Timer
from procsup._token.watch import TokenWatch

__all__ = ["RayBackend"]

logger = logging.getLogger("procsup")

_BOOT_DEADLINE = 120.0  # seconds for an agent (or the hub) to come up: a worker process, a zygote
_START_DEADLINE = 60.0  # seconds for an agent to answer a start (a task module's first import)
_FALLBACK_FLOOR = 1.0  # seconds a start sent again by Ray gets at least, its deadline spent or not
DIRECT = True  # starts go by the agents' doors (procsup._ray.channel); False: by Ray alone
_FLUSH_DEADLINE = 2.0  # seconds a failure's publication waits for the nodes to apply its cancel
_ANSWER_FLOOR = 1.0  # a node gets at least this long to answer a stop, however short the grace
_CONCURRENCY = 65536  # calls the hub may have pending: a cancel per batch, polls
# Ray SIGKILLs a dead worker's children: the agent's zygote must live on to stop the tasks'
# trees on their ladder (see procsup._ray.agent).
_AGENT_ENV = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "0"}}
_REFUSALS: dict[str, type[Exception]] = {
    "TypeError": TypeError,
    "ImportError": ImportError,
    "ModuleNotFoundError": ImportError,
    "ValueError": ValueError,
}


class RayBackend:
    """Runs on a Ray cluster (the runtime protocol); needs ``ray.is_initialized()``.

    Args:
        grace: Seconds tasks get to honour cancellation when their agent or driver is lost.
        preload: Modules each node's zygote imports before forking tasks.

    Invariants (under ``_lock``): ``_agents`` maps a node id to its current agent, not lost;
    ``_runs`` every started run whose outcome is not published; ``_closed`` is set once by
    ``close()``; ``_lost`` None until the hub was lost, then why.
    """

    def __init__(self, grace: float, preload: Sequence[str] = ()) -> None:
        self._grace = grace
        self._preload = tuple(preload)
        self._lock = threading.Lock()
        self._closed = False
        self._lost: str | None = None
        self._agents: dict[str, AgentLink] = {}
        self._every_agent: list[AgentLink] = []
        self._runs: dict[str, RayRun] = {}
        self._pending: list[RayRun] = []  # cancelled runs whose relay is not sent yet (loop only)
        self._placement = Placement()
        self._agent_cls = ray.remote(concurrency_groups=GROUPS)(Agent)
        here = ray.get_runtime_context().get_node_id()
        self._hub = (
            ray.remote(TokenHub)
            .options(
                num_cpus=0,
                max_concurrency=_CONCURRENCY,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote()
        )
        try:
            ray.get(self._hub.ping.remote(), timeout=_BOOT_DEADLINE)
        except (RayError, GetTimeoutError) as exc:
            ray.kill(self._hub)
            raise RuntimeError(f"procsup's token hub could not start on Ray: {exc}") from exc
        self._loop = LoopThread("procsup-ray")
        self._timers = TimerThread("procsup-ray-timers")
        self._watch = TokenWatch("procsup-ray-tokens")  # every run's token, from one thread
        self._loop.submit(self._follow_hub())

    # ------------------------------------------------------------ the protocol

    @property
    def grace_period(self) -> float:
        return self._grace

    @property
    def closed(self) -> bool:
        return self._closed or self._lost is not None

    def start(self, spec: RunSpec) -> RayRun:
        """Start one run on a node (see the runtime contract); blocks until its process exists.

        Raises:
            TypeError: the task, its args or kwargs cannot travel (a token among the args, say) or
                cannot be started on the node (no process exists then).
            ValueError: no alive node has what the task asks for.
            ImportError: a ``preload`` module is broken on the node.
            RuntimeError: after ``close()``, the hub was lost, or the node did not answer.
        """
        refuse_tokens(spec.description, spec.args, spec.kwargs)
        self._check_open()
        try:
            return self._start(spec)
        except _AgentGone as exc:
            # No process was started: its node's agent died since its last run. Once more,
            # with a new agent (or, if the node is gone, another node that fits).
            self._forget(exc.agent, exc.why)
            return self._start(spec)

    def _start(self, spec: RunSpec) -> RayRun:
        wants, node_id = demand(spec.options)
        node = self._placement.choose(wants, node_id)
        agent = self._agent(node)
        run = RayRun(spec, uuid.uuid4().hex, agent, wants)
        by_value, call = _pickled_call(spec)
        request = StartRequest(
            run_id=run.run_id,
            description=spec.description,
            call=call,
            by_value=by_value,
            key=_key(spec.task_fn),
            memory_limit=spec.options.memory_limit,
            cpu_time_limit=spec.options.cpu_time_limit,
            capture_output=spec.options.capture_output,
            cause=spec.token.cause,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("this RaySupervisor has been shut down")
            self._runs[run.run_id] = run
            agent.runs.add(run)
        try:
            started = self._send_start(agent, run, request)
        except BaseException:
            with self._lock:
                run.published = True  # nothing to publish: start() raises
                self._runs.pop(run.run_id, None)
                agent.runs.discard(run)
            raise
        run.pid = started.pid
        run.started = True
        self._placement.charge(agent.node_id, wants)
        if started.outcome is not None:  # it has ended already: one message, not two
            self._deliver(run, started.outcome, here=True)
        elif agent.lost is not None:  # lost as it answered: its loss may have passed this run by
            self._loop.call(self._agent_lost, agent, agent.lost)
        return run

    def stop(
        self,
        runs: Sequence[Run],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        *,
        failure: bool = False,
    ) -> Ladder:
        """Cancel the runs' tokens here, now; the rest of the ladder runs on their nodes.

        The returned ladder's ``done`` is set with what outlived SIGKILL once every node's ladder
        is done (or its agent was killed for not answering within the grace period).
        """
        ladder = Ladder((), grace)  # stepped on the nodes: only its ``done`` is used here
        mine = [run for run in runs if isinstance(run, RayRun) and not run.future.done()]
        now = time.monotonic()
        for run in mine:
            if failure:
                run.limit_reason = run.limit_reason or stop_reason
            else:
                run.stop_reason = run.stop_reason or stop_reason
            if grace is not None:
                run.signal_at = min(run.signal_at, now + grace)
            run.spec.token.cancel(cancel_reason)  # the ladder's first step, here and now
        if not mine:
            ladder.done.set_result([])
            return ladder
        self._loop.call(
            self._stop_on_nodes, mine, grace, cancel_reason, stop_reason, failure, ladder
        )
        return ladder

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self._timers.call_later(delay, callback)

    def live(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())

    def on_outcome_thread(self) -> bool:
        # Outcomes and ladders step on the loop; restarts and timeouts on the timers.
        return self._loop.current or self._timers.current

    def close(self) -> None:
        with self._lock:
            self._closed = True
            agents = list(self._every_agent)
        for agent in agents:
            if agent.channel is not None:
                agent.channel.close()

    def join(self, timeout: float) -> bool:
        """Once no run is live: let every agent go (its zygote exits), kill the actors, end the
        threads. True once the threads have ended."""
        deadline = time.monotonic() + timeout
        with self._lock:
            agents = [agent for agent in self._every_agent if agent.lost is None]
            for agent in agents:
                agent.lost = "its RaySupervisor shut down"
            self._agents.clear()
            every = list(self._every_agent)
        for agent in every:
            if agent.channel is not None:
                agent.channel.close()
        if ray.is_initialized():  # else Ray went first (ray.shutdown()), and our actors with it
            refs = [agent.actor.shutdown.remote(max(timeout / 2, 0.0)) for agent in agents]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0))
            for agent in agents:
                ray.kill(agent.actor, no_restart=True)
            try:
                ray.get(self._hub.close.remote(), timeout=max(deadline - time.monotonic(), 0.0))
            except (RayError, GetTimeoutError):
                pass
            ray.kill(self._hub, no_restart=True)
        watch_done = self._watch.close(max(deadline - time.monotonic(), 0.1))
        loop_done = self._loop.close(max(deadline - time.monotonic(), 0.1))
        timers_done = self._timers.close(max(deadline - time.monotonic(), 0.1))
        return watch_done and loop_done and timers_done

    def prefetch_facts(self) -> None:
        """Ask every node for its live runs' facts at once (one call per agent, two seconds at
        most), so that ``tasks()`` costs one round trip, not one per task."""
        by_agent: dict[AgentLink, list[RayRun]] = {}
        with self._lock:
            for run in self._runs.values():
                if run.agent.lost is None and run.agent.info is not None:
                    by_agent.setdefault(run.agent, []).append(run)
        asked = {agent.actor.facts.remote([r.run_id for r in runs]): runs
                 for agent, runs in by_agent.items()}  # fmt: skip
        if not asked:
            return
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=FACTS_DEADLINE)
        for ref in ready:
            try:
                answers = ray.get(ref)
            except RayError:
                continue
            for run, answer in zip(asked[ref], answers, strict=True):
                run.prefetched = facts_of(run, answer)

    def agents(self) -> list[NodeInfo]:
        """The nodes with an agent up, for ``RaySupervisor.nodes()``."""
        with self._lock:
            return [agent.node for agent in self._agents.values() if agent.info is not None]

    # ------------------------------------------------------------ starting

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RaySupervisor has been shut down")
        if self._lost is not None:
            raise RuntimeError(f"this RaySupervisor lost its token hub: {self._lost}")

    def _agent(self, node_id: str) -> AgentLink:
        """The node's agent, made and booted on first use (a Ray worker, then procsup's zygote)."""
        with self._lock:
            agent = self._agents.get(node_id)
            if agent is None:
                actor = self._agent_cls.options(
                    num_cpus=0,
                    max_concurrency=CALLS,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                    runtime_env=_AGENT_ENV,
                ).remote(self._hub, key := uuid.uuid4().hex, self._grace, self._preload)
                agent = self._agents[node_id] = AgentLink(key, node_id, actor)
                self._every_agent.append(agent)
        with agent.ready_lock:  # a second start for the same node waits for the same boot
            if agent.info is None:
                self._boot(agent)
        return agent

    def _boot(self, agent: AgentLink) -> None:
        try:
            answer = ray.get(agent.actor.ready.remote(), timeout=_BOOT_DEADLINE)
        except (RayError, GetTimeoutError) as exc:
            self._give_up(agent, f"it did not come up: {ray_reason(exc)}")
            raise RuntimeError(
                f"the procsup agent for Ray node {agent.node_id} could not start: {exc}"
            ) from exc
        if isinstance(answer, Refused):
            self._give_up(agent, answer.message)
            raise _REFUSALS.get(answer.kind, RuntimeError)(
                f"the procsup agent for Ray node {agent.node_id} could not start: {answer.message}"
            )
        assert isinstance(answer, Ready), answer
        if answer.door is not None:
            agent.channel = Channel(answer.door, answer.authkey)
        agent.info = answer.info
        self._loop.submit(self._follow_agent(agent))

    def _give_up(self, agent: AgentLink, why: str) -> None:
        self._forget(agent, why)
        ray.kill(agent.actor, no_restart=True)

    def _forget(self, agent: AgentLink, why: str) -> bool:
        """The agent is gone: no start goes to it again. True the first time."""
        with self._lock:
            if agent.lost is not None:
                return False
            agent.lost = why
            if self._agents.get(agent.node_id) is agent:
                del self._agents[agent.node_id]
        if agent.channel is not None:
            agent.channel.close()
        self._placement.invalidate()
        if not self._closed:
            self._hub.drop.remote(agent.key)
        return True

    def _send_start(self, agent: AgentLink, run: RayRun, request: StartRequest) -> Started:
        """By the agent's door if it can, else (or if that fails) by Ray: the agent answers a
        second copy of a start with the first one's answer, so whatever the door did with it,
        the start happens once and its answer (and a quick run's outcome in it) is not lost."""
        description = run.spec.description
        payload = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + _START_DEADLINE
        if DIRECT and agent.channel is not None:
            try:
                reply = agent.channel.call(payload, deadline)
            except ChannelError as exc:
                logger.debug("procsup: a start to Ray node %s goes by Ray: %s", agent.node, exc)
            else:
                return self._answered(run, pickle.loads(reply))
        started = agent.actor.start.remote(payload)
        try:
            reply = ray.get(started, timeout=max(deadline - time.monotonic(), _FALLBACK_FLOOR))
        except GetTimeoutError:
            agent.actor.discard.remote(run.run_id)
            raise RuntimeError(
                f"critical task {description!r} could not be started: the procsup agent on Ray "
                f"node {agent.node} did not answer within {_START_DEADLINE:g} s"
            ) from None
        except RayActorError as exc:
            raise _AgentGone(
                f"critical task {description!r} could not be started: the procsup agent on Ray "
                f"node {agent.node} was lost ({ray_reason(exc)})",
                agent,
                ray_reason(exc),
            ) from exc
        except RayError as exc:
            raise RuntimeError(
                f"critical task {description!r} could not be started on Ray node {agent.node}: "
                f"{ray_reason(exc)}"
            ) from exc
        return self._answered(run, pickle.loads(reply))

    def _answered(self, run: RayRun, answer: Started | Refused) -> Started:
        if isinstance(answer, Refused):
            raise _REFUSALS.get(answer.kind, RuntimeError)(answer.message)
        assert isinstance(answer, Started), answer
        if answer.outcome is not None:  # nothing left to relay to the node
            return answer
        # Watched from here on (a cancellation since the request was made fires at once), until
        # the outcome is out: if it is out already, the watch goes at once.
        run.watched = self._watch.watch(
            run.spec.token, lambda cause: self._loop.call(self._token_cancelled, run)
        )
        if run.future.done():
            run.watched.cancel()
        return answer

    # ------------------------------------------------------------ on the loop

    async def _follow_agent(self, agent: AgentLink) -> None:
        """Long-poll the agent for outcomes; its death fails the poll: its runs are lost."""
        acked = 0
        while True:
            try:
                batch = await agent.actor.outcomes.remote(acked)
            except asyncio.CancelledError:
                raise
            except RayActorError as exc:
                self._agent_lost(agent, ray_reason(exc))
                return
            except Exception as exc:  # noqa: BLE001 - outcomes we cannot read are lost outcomes
                self._agent_lost(agent, f"its outcomes could not be read: {exc!r}")
                return
            if batch is None:  # it shut down: every run of it was published before
                return
            for seq, name, entry in batch:
                acked = seq
                if isinstance(entry, StopDone):
                    stop = agent.stops.pop(name, None)
                    if stop is not None and not stop.done():
                        stop.set_result(list(entry.stuck))
                    continue
                with self._lock:
                    run = self._runs.get(name)
                if run is not None:  # else: a start we gave up on
                    self._deliver(run, entry)

    def _deliver(self, run: RayRun, outcome: Outcome, here: bool = False) -> None:
        """Publish an outcome from the node: on the loop, or ``here`` (the thread whose start
        it answered) when it is a value, which needs nothing of the loop."""
        if outcome.cancelled is not None:  # the relay up may not have come yet
            run.upward = True
            run.spec.token.cancel(outcome.cancelled)
        value, error = decode(outcome, run.spec.description, run.pid)
        if here and error is not None:
            self._loop.call(self._publish, run, value, error, outcome.exitcode)
        else:
            self._publish(run, value, error, outcome.exitcode)

    def _publish(
        self, run: RayRun, value: Any, error: CriticalTaskError | None, exitcode: int | None
    ) -> None:
        """Out of the live runs; a failure cancels the parent first (and, on other nodes, waits
        for that to be applied); then the future."""
        with self._lock:
            if run.published:
                return  # already out, or a start that failed: start() has raised
            run.published = True
            self._runs.pop(run.run_id, None)
            run.agent.runs.discard(run)
        run.exitcode = exitcode
        if run.watched is not None:
            run.watched.cancel()  # cheap: the watch's thread is not woken for it
        self._placement.release(run.agent.node_id, run.wants)
        if error is None:
            logger.debug("Critical task '%s' completed successfully", run.spec.description)
            run.future.set_result(value)
            return
        if exitcode is not None:
            error.exitcode = exitcode
        error.add_note(f"ran on Ray node {run.agent.node}, pid {error.pid or run.pid}")
        stopped = isinstance(error, TaskCrashedError) and error.stopped
        if stopped or not run.spec.cancels_parent:
            (logger.warning if stopped else logger.error)("%s", error)
            run.future.set_exception(error)
            return
        run.spec.parent.cancel(str(error))
        logger.error("%s", error)
        asyncio.get_running_loop().create_task(self._flush_then(run.future, error))

    async def _flush_then(
        self, future: concurrent.futures.Future[Any], error: BaseException
    ) -> None:
        """Wait (bounded) until the nodes have applied every cancellation pending now."""
        self._collect_cancelled()
        self._send_relays()
        with self._lock:
            refs = {id(run.relayed): run.relayed for run in self._runs.values() if run.relayed}
        if refs:
            waits = [asyncio.wrap_future(ref.future()) for ref in refs.values()]
            _, slow = await asyncio.wait(waits, timeout=_FLUSH_DEADLINE)
            for wait in slow:
                wait.cancel()
            if slow:
                logger.warning(
                    "procsup: %d Ray agents did not confirm a cancellation within %g s",
                    len(slow),
                    _FLUSH_DEADLINE,
                )
        future.set_exception(error)

    def _collect_cancelled(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            cancelled = run.relayed is None and not run.upward and run.spec.token.is_cancelled()
            if cancelled and run not in self._pending:
                self._pending.append(run)

    def _token_cancelled(self, run: RayRun) -> None:
        """The run's token is cancelled (``TokenWatch``): carry that to its node."""
        if run.upward or run.relayed is not None or run.future.done():
            return
        self._pending.append(run)
        if len(self._pending) == 1:  # batch what wakes together (a root's cancellation)
            asyncio.get_running_loop().call_soon(self._send_relays)

    def _send_relays(self) -> None:
        pending, self._pending = self._pending, []
        batches: dict[AgentLink, list[RayRun]] = {}
        for run in pending:
            if run.relayed is None and not run.future.done() and run.agent.lost is None:
                batches.setdefault(run.agent, []).append(run)
        for agent, runs in batches.items():
            items = [(run.run_id, run.spec.token.cause or "cancelled") for run in runs]
            ref = self._hub.cancel.remote(agent.key, items)
            for run in runs:
                run.relayed = ref

    async def _follow_hub(self) -> None:
        """Long-poll the hub for tasks that cancelled their own token."""
        acked = 0
        while True:
            try:
                batch = await self._hub.driver_poll.remote(acked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the hub is gone
                self._hub_lost(ray_reason(exc))
                return
            if batch is None:
                return
            for seq, run_id, cause in batch:
                acked = seq
                with self._lock:
                    run = self._runs.get(run_id)
                if run is not None:
                    run.upward = True
                    run.spec.token.cancel(cause)

    def _hub_lost(self, why: str) -> None:
        if self._closed:
            return
        self._lost = why
        logger.error(
            "procsup: the token hub of a RaySupervisor was lost (%s); every node's agent stops "
            "its tasks, and no task starts any more",
            why,
        )

    def _agent_lost(self, agent: AgentLink, why: str) -> None:
        """The agent (or its node) is gone: its runs crashed, naming the node."""
        if agent.killed is not None:
            why = (
                f"its node did not answer a stop within {agent.killed:g} s, so its agent was "
                f"killed (ray.kill): {why}"
            )
        if self._forget(agent, why) and not self._closed:
            logger.error("procsup: lost the agent on Ray node %s: %s", agent.node, why)
        stops, agent.stops = agent.stops, {}
        for stop in stops.values():  # what its ladders left is for its zygote's guardian now
            if not stop.done():
                stop.set_result([])
        for run in list(agent.runs):
            if not run.started:  # its start() is waiting for the agent: it raises, or retries
                continue
            if run.stop_reason is not None and agent.killed is not None:
                error = killed(run.spec.description, run.pid, agent.node, run.stop_reason,
                               agent.killed)  # fmt: skip
            else:
                error = lost(run.spec.description, run.pid, agent.node, agent.lost or why)
            self._publish(run, None, error, None)

    def _stop_on_nodes(
        self,
        runs: list[RayRun],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        failure: bool,
        ladder: Ladder,
    ) -> None:
        by_agent: dict[AgentLink, list[RayRun]] = {}
        for run in runs:
            by_agent.setdefault(run.agent, []).append(run)
        stops = [
            self._stop_on(agent, [r.run_id for r in mine], grace, cancel_reason, stop_reason,
                          failure)
            for agent, mine in by_agent.items()
        ]  # fmt: skip

        async def finish() -> None:
            results = await asyncio.gather(*stops)
            ladder.done.set_result([line for stuck in results for line in stuck])

        asyncio.get_running_loop().create_task(finish())

    async def _stop_on(
        self,
        agent: AgentLink,
        run_ids: list[str],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        failure: bool,
    ) -> list[str]:
        """One node's part of a stop: what outlived SIGKILL there."""
        if agent.lost is not None:
            return []
        stop_id = uuid.uuid4().hex
        request = StopRequest(stop_id, tuple(run_ids), grace, cancel_reason, stop_reason, failure)
        stuck: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        agent.stops[stop_id] = stuck
        answered = agent.actor.stop.remote(request)
        wait = None if grace is None else max(grace, _ANSWER_FLOOR)
        try:
            await asyncio.wait_for(_awaited(answered), wait)
        except TimeoutError:
            assert wait is not None
            logger.error(
                "procsup: Ray node %s did not answer a stop within %g s; killing its agent",
                agent.node,
                wait,
            )
            agent.killed = wait  # its runs are published as lost once its outcomes poll fails
            agent.stops.pop(stop_id, None)
            ray.kill(agent.actor, no_restart=True)
            return []
        except RayError:
            agent.stops.pop(stop_id, None)
            return []  # the agent is gone: its runs are published as lost
        return await stuck  # its StopDone, on the outcomes poll (or [] once the agent is lost)


class _AgentGone(RuntimeError):
    """A start found its agent dead: no process was started."""

    def __init__(self, message: str, agent: AgentLink, why: str) -> None:
        super().__init__(message)
        self.agent = agent
        self.why = why


async def _awaited(ref: Any) -> Any:
    return await ref


def _pickled_call(spec: RunSpec) -> tuple[bool, bytes]:
    """``(by_value, (task_fn, args, kwargs) pickled)``, with cloudpickle as Ray would have: by
    reference what the node can import by name, by value the rest (lambdas, closures, the
    driver's ``__main__``). ``by_value`` says that a plain pickle would not do (as for a local
    start, ``procsup._process.reduction.by_value``): the task process then opens the blob itself.

    Raises:
        TypeError: not even cloudpickle can pickle it; no process is started.
    """
    call = (spec.task_fn, tuple(spec.args), dict(spec.kwargs))
    try:
        blob = dumps_by_value(call)
    except Exception as exc:
        raise TypeError(
            f"critical task {spec.description!r} could not be started on Ray: its function, "
            f"args and kwargs must be serializable with cloudpickle ({exc})"
        ) from exc
    return by_value(*call), blob


def _key(task_fn: Callable[..., Any]) -> str:
    """Names a task function (``StartRequest.key``)."""
    module = getattr(task_fn, "__module__", None) or "__main__"
    return f"{module}.{getattr(task_fn, '__qualname__', type(task_fn).__qualname__)}"
