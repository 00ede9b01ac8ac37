"""The agent: one async Ray actor per node, starting and stopping runs there with the local backend.

::

    driver                          Agent (a Ray actor pinned to its node)
    ──────                          ──────────────────────────────────────
    ready() ──────────────────────▶ boot: procsup's zygote and supervision thread, proven by a
                                      warm-up task; start long-polling the token hub
    start(StartRequest) ──────────▶ token = root.child_token() (born cancelled if asked)
                                    LocalBackend.start(RunSpec): the node's zygote forks the task
    ◀── Started(pid) ──────────────   (by reference; by value through procsup._ray.entry when
                                      plain pickle refuses the task or its arguments)
    outcomes(acked) long poll ────▶ the runs ended since ``acked`` (the node's supervision
    ◀── [(seq, run id, Outcome)] ──   thread reaped, classified, recorded the crash): encode()
                                      it is also how the driver learns that the agent died
    stop(StopRequest) ────────────▶ LocalBackend.stop(): the ladder runs here (cancel, grace,
    ◀── True, then stopped(id) ────   SIGTERM, SIGKILL of the tree), stepped by local timers
    hub.agent_poll() long poll ───▶ cancellations from the driver ─▶ token.cancel(cause)
    TokenWatch ───────────────────▶ the task cancelled its own token ─▶ hub.report()
    the hub is gone, or drops us ─▶ fail-safe: cancel every token, stop every run (grace)

The agent is what a ``Supervisor`` is on one machine minus its lifecycle: the driver's
``Lifecycle`` decides restarts and timeouts, the agent only runs what it is told to, with the same
local backend (``procsup._supervision.local``) a ``Supervisor`` drives. So signals, exit codes and
crash records are observed on the node, by the process's parent, not guessed from afar.

Invariants: ``_runs`` holds every started run whose outcome is not encoded yet; ``_outbox`` every
encoded outcome the driver has not acknowledged, in ``seq`` order; ``_stops`` a future per stop
that ``stopped()`` waits on or that was resolved before anybody asked (Ray may run an actor's calls
out of order); ``_early`` the causes of cancellations that arrived before their run's start;
``_gone`` the most recent ended run ids, so a late cancellation is dropped, not kept as early;
``_discarded`` the starts the driver gave up on before they came;
``_warm`` the task modules the node's zygote has imported (their starts need not leave the loop);
``_lost`` is None until the fail-safe fired, then why (no start after it).

Things that don't work
----------------------
- A Ray actor per run: an actor's creation costs a worker process (~0.4 s here) and Ray observes
  its end only as ``ActorDiedError``, with no signal and no exit code (ray-project/ray#18890).
  One agent per node starts runs as the local backend does, in milliseconds.
- A pending ``outcome(run id)`` call per run: each start then submits two calls, and the second
  costs the driver about as much as the first. One long poll per agent carries every outcome.
- Relying on Ray alone to end a dead driver's work: ``ray.kill`` and a dead owner end the agent's
  process, and Ray then SIGKILLs its children and its process group, but not what they started:
  a task's own children, orphaned, escaped to init. So the agent runs with Ray's killing of its
  children off (``RAY_kill_child_processes_on_worker_exit=0``, set by the driver) and its zygote in
  a process group of its own: the zygote outlives the agent and its guardian
  (``procsup._process.guardian``) stops every task tree on the ladder (cancel, grace, SIGTERM,
  SIGKILL of the whole tree). The fail-safe here does the same when the agent lives but its
  driver is gone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import socket
from typing import Any

import ray

from procsup._process import zygote
from procsup._ray.entry import call_pickled, pickled, warm_up
from procsup._ray.hub import POLL_SECONDS
from procsup._ray.messages import NodeInfo, Outcome, Refused, Started, StartRequest, StopRequest
from procsup._ray.outcome import encode, ray_reason
from procsup._supervision.local import OWN_PRELOAD, LocalBackend, LocalConfig
from procsup._supervision.monitor import TaskRecord
from procsup._supervision.options import DEFAULT, TaskOptions
from procsup._supervision.runtime import RunSpec
from procsup._token.token import CancellationToken
from procsup._token.watch import TokenWatch, Watched

__all__ = ["Agent"]

logger = logging.getLogger("procsup.agent")

_BOOT_DEADLINE = 120.0  # seconds for the warm-up task (the zygote imports procsup and preload)
_ENDED_KEPT = 4096  # ended run ids remembered, so a cancellation arriving late is dropped


@dataclasses.dataclass
class _Run:
    """A started run: its local record, its token (the driver's token's mirror), its watcher.

    ``quiet`` once the driver cancelled the token (or is stopping the run): the watcher must not
    report that cancellation back up as the task's own.
    """

    record: TaskRecord
    token: CancellationToken
    quiet: bool
    watched: Watched | None = None


class Agent:
    """The agent actor (see the module docstring); made by the driver with ``ray.remote``.

    Args:
        hub: The supervisor's token hub (an actor handle).
        key: This agent's name at the hub (one per agent incarnation).
        grace: Seconds tasks get to honour cancellation when the agent or its driver is lost.
        preload: Modules the node's zygote imports before forking tasks.
    """

    def __init__(self, hub: Any, key: str, grace: float, preload: tuple[str, ...]) -> None:
        self._hub = hub
        self._key = key
        self._grace = grace
        zygote.lead_own_process_group()  # Ray kills our group when we die; it must live on
        # The driver logs every outcome; Ray would print the node's copy beside it. What the
        # agent itself has to say (the fail-safe) goes to "procsup.agent", which stays loud.
        logging.getLogger("procsup").setLevel(logging.CRITICAL)
        logger.setLevel(logging.INFO)
        self._backend = LocalBackend(LocalConfig("forkserver", (*OWN_PRELOAD, *preload), grace))
        self._root = CancellationToken()  # every run's token is a child: the fail-safe cancels it
        self._watch = TokenWatch("procsup-agent-tokens")  # every run's token, from one thread
        self._runs: dict[str, _Run] = {}
        self._outbox: list[tuple[int, str, Outcome]] = []
        self._outbox_seq = 0
        self._outbox_changed = asyncio.Event()
        self._stops: dict[str, asyncio.Future[list[str]]] = {}
        self._warm: set[str] = set()
        self._early: dict[str, str] = {}
        self._discarded: set[str] = set()
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lost: str | None = None
        self._closing = False
        self._poller: asyncio.Task[None] | None = None
        self._info = NodeInfo(
            node_id=ray.get_runtime_context().get_node_id(),
            ip=ray.util.get_node_ip_address(),
            hostname=socket.gethostname(),
            agent_pid=os.getpid(),
        )

    # ------------------------------------------------------------ lifetime

    async def ready(self) -> NodeInfo | Refused:
        """Boot the node's zygote and supervision thread, then follow the hub. Idempotent."""
        loop = asyncio.get_running_loop()
        if self._poller is None:
            try:
                await loop.run_in_executor(None, self._warm_up)
            except (ImportError, RuntimeError, OSError, concurrent.futures.TimeoutError) as exc:
                return Refused(type(exc).__name__, f"{exc} (on Ray node {self._info})")
            self._poller = loop.create_task(self._poll())
        return self._info

    def _warm_up(self) -> None:
        record = self._backend.start(
            RunSpec(warm_up, "procsup agent warm-up", (), {}, self._root,
                    self._root.child_token(), DEFAULT, cancels_parent=False)
        )  # fmt: skip
        record.future.result(_BOOT_DEADLINE)

    async def shutdown(self, timeout: float) -> bool:
        """Let go: stop what still runs at once, end the supervision thread and the zygote.

        Returns True once both have ended within ``timeout`` seconds.
        """
        self._closing = True
        self._backend.close()
        records = [run.record for run in self._runs.values()]
        if records:
            reason = "its RaySupervisor shut down"
            self._backend.stop(records, 0.0, reason, reason)
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(None, self._backend.join, timeout)
        await loop.run_in_executor(None, self._watch.close, timeout)
        await loop.run_in_executor(None, zygote.shutdown)
        if self._poller is not None:
            self._poller.cancel()
        self._outbox_changed.set()  # outcomes() returns None from now on
        return bool(done)

    # ------------------------------------------------------------ runs

    async def start(self, request: StartRequest) -> Started | Refused:
        """Start one run; Refused (and no process) if it cannot be started here."""
        run_id = request.run_id
        if run_id in self._discarded:  # the driver gave up on it before it came
            self._discarded.discard(run_id)
            return Refused("RuntimeError", "the driver gave up on this start")
        if self._lost is not None or self._closing:
            why = self._lost or "its RaySupervisor is shutting down"
            return Refused("RuntimeError", f"the procsup agent on Ray node {self._info}: {why}")
        token = self._root.child_token()
        cause = request.cause or self._early.pop(run_id, None)
        if cause is not None:
            token.cancel(cause)
        options = TaskOptions(
            memory_limit=request.memory_limit,
            cpu_time_limit=request.cpu_time_limit,
            capture_output=request.capture_output,
        )
        spec = RunSpec(
            task_fn=request.task_fn,
            description=request.description,
            args=tuple(request.args),
            kwargs=dict(request.kwargs),
            parent=self._root,  # never cancelled by the run: cancels_parent is the driver's
            token=token,
            options=options,
            cancels_parent=False,
        )
        loop = asyncio.get_running_loop()
        module = getattr(request.task_fn, "__module__", None) or "__main__"
        try:
            if module in self._warm:  # about a millisecond: not worth two thread hand-offs
                record = self._start(spec)
            else:  # off the loop: the zygote imports the task's module first, maybe for seconds
                record = await loop.run_in_executor(None, self._start, spec)
                self._warm.add(module)
        except (TypeError, ImportError, RuntimeError, ValueError, OSError) as exc:
            return Refused(type(exc).__name__, f"{exc} (on Ray node {self._info})")
        run = _Run(record, token, quiet=cause is not None)
        self._runs[run_id] = run
        if run_id in self._discarded:  # given up on while the zygote forked it
            self._discarded.discard(run_id)
            await self.discard(run_id)
        run.watched = self._watch.watch(token, functools.partial(self._cancelled, loop, run_id))
        record.future.add_done_callback(functools.partial(self._done, loop, run_id))
        return Started(record.pid)

    def _start(self, spec: RunSpec) -> TaskRecord:
        try:
            return self._backend.start(spec)
        except TypeError:
            # By value: a lambda, a closure, a function of the driver's __main__, or arguments
            # plain pickle refuses. Ray brought them here with cloudpickle; so does the zygote.
            try:
                blob = pickled(spec.task_fn, spec.args, dict(spec.kwargs))
            except Exception as exc:
                raise TypeError(
                    f"critical task {spec.description!r} could not be started: its function, "
                    f"args and kwargs must be serializable with cloudpickle ({exc})"
                ) from exc
            return self._backend.start(
                dataclasses.replace(spec, task_fn=call_pickled, args=(blob,), kwargs={})
            )

    def _done(
        self, loop: asyncio.AbstractEventLoop, run_id: str, _: concurrent.futures.Future[Any]
    ) -> None:
        """On the node's supervision thread: hand the outcome to the actor's loop."""
        try:
            loop.call_soon_threadsafe(self._ended, run_id)
        except RuntimeError:  # the actor's loop is closed: the actor is exiting
            pass

    def _ended(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        if run.watched is not None:
            run.watched.cancel()
        self._gone[run_id] = None
        while len(self._gone) > _ENDED_KEPT:
            self._gone.popitem(last=False)
        record = run.record
        self._outbox_seq += 1
        outcome = encode(record.future, record.description, record.exitcode)
        if not run.quiet and run.token.is_cancelled():  # by the task itself
            outcome = dataclasses.replace(outcome, cancelled=run.token.cause or "cancelled")
        self._outbox.append((self._outbox_seq, run_id, outcome))
        self._outbox_changed.set()

    async def outcomes(self, acked: int) -> list[tuple[int, str, Outcome]] | None:
        """The outcomes after ``acked``, waiting up to ``POLL_SECONDS`` for one; None once the
        agent has shut down. The driver keeps one such call pending: the agent's death fails it."""
        self._outbox = [entry for entry in self._outbox if entry[0] > acked]
        if not self._outbox and not self._closing:
            self._outbox_changed.clear()
            try:
                await asyncio.wait_for(self._outbox_changed.wait(), POLL_SECONDS)
            except TimeoutError:
                pass
        if self._closing and not self._outbox:
            return None
        return list(self._outbox)

    async def discard(self, run_id: str) -> None:
        """The driver gave up on a start it sent (it did not answer in time): stop the run if it
        started after all."""
        run = self._runs.get(run_id)
        if run is not None:
            run.quiet = True
            reason = "its start was given up by the driver"
            self._backend.stop([run.record], 0.0, reason, reason)
        elif run_id not in self._gone:
            self._discarded.add(run_id)  # Ray may run this call before the start it is about

    async def stop(self, request: StopRequest) -> bool:
        """Start the ladder for the runs named (the cancel is done when this returns)."""
        records = []
        for run_id in request.run_ids:
            run = self._runs.get(run_id)
            if run is not None:
                run.quiet = True
                records.append(run.record)
        ladder = self._backend.stop(
            records, request.grace, request.cancel_reason, request.stop_reason,
            failure=request.failure,
        )  # fmt: skip
        future = self._stop_future(request.stop_id)
        ladder.done.add_done_callback(
            lambda done: future.get_loop().call_soon_threadsafe(_copy, done, future)
        )
        return True

    async def stopped(self, stop_id: str) -> list[str]:
        """What outlived SIGKILL once the stop's ladder is done (usually nothing)."""
        try:
            return await self._stop_future(stop_id)
        finally:
            self._stops.pop(stop_id, None)

    def _stop_future(self, stop_id: str) -> asyncio.Future[list[str]]:
        future = self._stops.get(stop_id)
        if future is None:
            future = self._stops[stop_id] = asyncio.get_running_loop().create_future()
        return future

    async def facts(self, run_ids: list[str]) -> list[tuple[int | None, int | None, float | None]]:
        """Each run's process now: pid, RSS, CPU % (None where unknown)."""
        answers: list[tuple[int | None, int | None, float | None]] = []
        for run_id in run_ids:
            run = self._runs.get(run_id)
            if run is None:
                answers.append((None, None, None))
            else:
                facts = run.record.facts()
                answers.append((facts.pid, facts.rss, facts.cpu_percent))
        return answers

    # ------------------------------------------------------------ tokens

    def _cancelled(self, loop: asyncio.AbstractEventLoop, run_id: str, cause: str) -> None:
        """On the token watch's thread: a run's token is cancelled; the actor's loop decides."""
        with contextlib.suppress(RuntimeError):  # the actor's loop is closed: it is exiting
            loop.call_soon_threadsafe(self._report, run_id, cause)

    def _report(self, run_id: str, cause: str) -> None:
        """Tell the driver when the task cancelled its own token (the driver holds the original)."""
        run = self._runs.get(run_id)
        if run is None or run.quiet or self._lost is not None or self._closing:
            return
        self._hub.report.remote(self._key, [(run_id, cause)])

    def _cancel_from_driver(self, run_id: str, cause: str) -> None:
        run = self._runs.get(run_id)
        if run is not None:
            run.quiet = True
            run.token.cancel(cause)
        elif run_id not in self._gone:
            self._early[run_id] = cause  # its start is on its way

    async def _poll(self) -> None:
        acked = 0
        while True:
            try:
                batch = await self._hub.agent_poll.remote(self._key, acked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the hub is gone
                self._fail_safe(f"its driver's token hub is gone ({ray_reason(exc)})")
                return
            if batch is None:
                if not self._closing:
                    self._fail_safe("its RaySupervisor let it go")
                return
            for seq, run_id, cause in batch:
                self._cancel_from_driver(run_id, cause)
                acked = seq

    def _fail_safe(self, why: str) -> None:
        """The driver is gone or gave up on us: nothing started here may outlive it."""
        self._lost = why
        cause = f"the procsup agent on Ray node {self._info} lost its driver: {why}"
        logger.error("%s; stopping its %d tasks", cause, len(self._runs))
        self._root.cancel(cause)
        records = [run.record for run in self._runs.values()]
        if records:
            stop = f"its driver was lost and it did not honour cancellation within {self._grace} s"
            self._backend.stop(records, self._grace, cause, stop)
        self._backend.close()


def _copy(done: concurrent.futures.Future[list[str]], future: asyncio.Future[list[str]]) -> None:
    if not future.done():
        future.set_result(done.result())
