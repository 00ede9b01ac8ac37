"""The agent: one threaded Ray actor per node, starting and stopping runs there, locally.

::

    driver                          Agent (a Ray actor pinned to its node)
    ──────                          ──────────────────────────────────────
    ready() ──────────────────────▶ boot: procsup's zygote and supervision thread, proven by a
                                      warm-up task; a thread starts long-polling the token hub;
    ◀── Ready(node, door, authkey) ─  the door opens (procsup._ray.channel)
    the door: a StartRequest ─────▶ on the connection's thread, as start() does below
    start(StartRequest, pickled) ─▶ a copy of a start seen before (the driver sends a start
      (Ray: when the door failed)     again by Ray when the door failed it): the first one's
                                      answer, and nothing started
                                    token = root.child_token() (born cancelled if asked)
                                    LocalBackend.start(RunSpec): the node's zygote forks the task
                                      (by reference; by value through procsup._ray.entry)
                                    a task one of whose last _RECENT runs here ended within
                                      _QUICK: wait up to that long for this run's outcome (the
                                      supervision thread hands it over), so that one message
                                      carries both
    ◀── Started(pid, outcome?) ────
    outcomes(acked) long poll ────▶ the runs ended (the node's supervision thread reaped,
    ◀── [(seq, id, Outcome | ──────   classified, recorded the crash: encode()) and the stops
          StopDone)]                  done since ``acked``; its failing is also how the driver
                                      learns that the agent died
    stop(StopRequest) ────────────▶ LocalBackend.stop(): the ladder runs here (cancel, grace,
    ◀── True; StopDone on the poll    SIGTERM, SIGKILL of the tree), stepped by local timers
    hub.agent_poll() long poll ───▶ cancellations from the driver ─▶ token.cancel(cause)
    TokenWatch ───────────────────▶ the task cancelled its own token ─▶ hub.report()
    the hub is gone, or drops us ─▶ fail-safe: cancel every token, stop every run (grace)

The agent is what a ``Supervisor`` is on one machine minus its lifecycle: the driver's
``Lifecycle`` decides restarts and timeouts, the agent only runs what it is told to, with the same
local backend (``procsup._supervision.local``) a ``Supervisor`` drives. So signals, exit codes and
crash records are observed on the node, by the process's parent, not guessed from afar.

Its calls run on Ray's threads, in three concurrency groups (``CALLS``, ``GROUPS``): starts in the
default one, ``stop``/``discard``/``facts``/``shutdown`` in "control" (never queued behind a start
importing a task's module), the outcomes poll in "poll". The hub is long-polled by a thread of
the agent's own, the door's starts come on its threads, and the node's supervision and
token-watch threads call in under ``_lock``.

A start comes by the door when it can, not by a Ray actor call: start to result, alternated start
by start in one cluster, was 2.40-2.54 ms by the door against 3.78-3.93 ms by Ray (three runs of
400). The driver falls back to the Ray call whenever the door fails it (no connection, a reset,
EOF, no answer in time), not knowing whether the request arrived or was answered; so a start is
idempotent by run id. Its answer is kept until the driver is known to have read it (Ray carried
it, or the driver's next request, or its goodbye, came on the same connection), and a second copy
gets that answer (waiting for it while the first is still starting): one process, and a quick
run's outcome, which rides only that answer, is not lost. A late copy of a start whose answer was
read starts nothing either (the driver no longer listens for it).
``discard`` is unchanged: it is sent only once the Ray call, the last resort, has timed out.

Invariants (under ``_lock``): ``_runs`` holds every started run whose outcome is not encoded yet;
``_outbox`` every encoded outcome and every done stop the driver has not acknowledged, in ``seq``
order; ``_early`` the causes of cancellations that arrived before their run's start; ``_gone`` the
most recent ended run ids, so a late cancellation is dropped, not kept as early; ``_discarded``
the starts the driver gave up on before they came; ``_quick`` which of the last ``_RECENT`` runs
of each task function ended within ``_QUICK`` (a bit each, the latest lowest); ``_lost`` is None
until the fail-safe fired, then why (no start after it). A run's ``waiter`` is set while its start
waits for its outcome: the supervision thread hands the outcome to it then, not to the outbox.
``_starts`` maps the run id of each of the last ``_STARTS_KEPT`` starts (and of every one still
starting) to a future of its pickled answer while the driver may not have read it, then to None;
``_door`` is None until ``ready()`` opened it, and is closed by ``shutdown()``, by the fail-safe
or by ``close_door()``.

Things that don't work
----------------------
- A Ray actor per run: an actor's creation costs a worker process (~0.4 s here) and Ray observes
  its end only as ``ActorDiedError``, with no signal and no exit code (ray-project/ray#18890).
  One agent per node starts runs as the local backend does, in milliseconds.
- A pending ``outcome(run id)`` call per run: each start then submits two calls, and the second
  costs the driver about as much as the first. One long poll per agent carries every outcome that
  did not ride its start's answer.
- Letting the last run alone say whether a task is quick: on a loaded machine a trivial task's
  run now and then takes longer than ``_QUICK`` (the load, not the task), and the start after it
  then answered at once and sent its outcome on the poll, the second message. With the last
  three runs deciding, 0.8-1.2% of a trivial task's starts did not carry their outcome, against
  2.4-5.6% (two runs of 250, alternated in one cluster, at a load of about 8; the median start to
  result 0.18-0.20 ms lower). A task that turned slow costs at most ``_RECENT`` starts a wait of
  ``_QUICK`` in vain.
- Answering as soon as the result frame is read, before the zygote reports the exit: it would
  spare the wait from the frame to the reaping (0.3-0.7 ms here), but ``join()`` would return
  before the process is reaped and without its exit code, which a local ``Supervisor`` never
  does (``procsup._supervision.monitor``).
- An asyncio actor: each call hops from Ray's task thread to the actor's event loop and back, and
  an outcome from the supervision thread to the loop: measured 0.13-0.22 ms of a start here.
- A ``stopped(stop id)`` call per stop, waiting for its ladder: it holds one of a threaded actor's
  threads for as long as the task takes to honour its token (forever, for ``stop(None)``), and
  enough of them would starve the others. Done stops ride the outcomes poll instead.
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

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from procsup._process import zygote
from procsup._ray.channel import Door
from procsup._ray.entry import call_pickled, pickled, warm_up
from procsup._ray.hub import POLL_SECONDS
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
from procsup._ray.outcome import encode, ray_reason
from procsup._supervision.local import OWN_PRELOAD, LocalBackend, LocalConfig
from procsup._supervision.monitor import TaskRecord
from procsup._supervision.options import DEFAULT, TaskOptions
from procsup._supervision.runtime import RunSpec
from procsup._token.token import CancellationToken
from procsup._token.watch import TokenWatch, Watched

__all__ = ["CALLS", "GROUPS", "Agent"]

logger = logging.getLogger("procsup.agent")

CALLS = 16  # threads for starts (the default group): each waits up to _QUICK, a first import more
GROUPS = {"control": 4, "poll": 2}  # stop, discard, facts, shutdown; the outcomes poll
_BOOT_DEADLINE = 120.0  # seconds for the warm-up task (the zygote imports procsup and preload)
_ENDED_KEPT = 4096  # ended run ids remembered, so a cancellation arriving late is dropped
_QUICK = 0.005  # seconds: a task one of whose last _RECENT runs here took at most this has its
# start answered once this run ends, if it ends within this long: one message to the driver, not two
_RECENT = 3  # runs of a task function remembered for _QUICK
_QUICK_KEPT = 1024  # task functions whose last runs are remembered
_LAST_RUNS = (1 << _RECENT) - 1
_STARTS_KEPT = 4096  # run ids whose start was answered, so a second copy of one starts nothing
_REPEAT_DEADLINE = 120.0  # seconds a second copy of a start waits for the first's answer
_DOOR_DEADLINE = 2.0  # seconds shutdown() waits for the door's threads


F = TypeVar("F", bound=Callable[..., Any])

_REPEATED = pickle.dumps(
    Refused("RuntimeError", "a second copy of a start the driver has the answer to"),
    pickle.HIGHEST_PROTOCOL,
)
_SLOW = pickle.dumps(
    Refused("RuntimeError", f"the first copy of this start did not end in {_REPEAT_DEADLINE:g} s"),
    pickle.HIGHEST_PROTOCOL,
)


def _in_group(group: str) -> Callable[[F], F]:
    """``ray.method(concurrency_group=group)``, typed."""
    decorate: Callable[[F], F] = ray.method(concurrency_group=group)
    return decorate


@dataclasses.dataclass
class _Run:
    """A started run: its local record, its token (the driver's token's mirror), its watcher.

    ``quiet`` once the driver cancelled the token (or is stopping the run): the watcher must not
    report that cancellation back up as the task's own. ``began`` (monotonic) and ``key`` time
    the run for ``_QUICK``; ``waiter`` is set while its start waits for its outcome.
    """

    record: TaskRecord
    token: CancellationToken
    quiet: bool
    key: str
    began: float
    watched: Watched | None = None
    waiter: concurrent.futures.Future[Outcome] | None = None


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
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # the outbox grew, or we are closing
        self._boot_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._outbox: list[tuple[int, str, Outcome | StopDone]] = []
        self._seq = 0
        self._early: dict[str, str] = {}
        self._discarded: set[str] = set()
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._quick: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lost: str | None = None
        self._closing = False
        self._poller: threading.Thread | None = None
        self._door: Door | None = None
        self._starts: collections.OrderedDict[str, concurrent.futures.Future[bytes] | None]
        self._starts = collections.OrderedDict()
        self._counts = {"direct": 0, "ray": 0, "repeated": 0}
        self._info = NodeInfo(
            node_id=ray.get_runtime_context().get_node_id(),
            ip=ray.util.get_node_ip_address(),
            hostname=socket.gethostname(),
            agent_pid=os.getpid(),
        )

    # ------------------------------------------------------------ lifetime

    def ready(self) -> Ready | Refused:
        """Boot the node's zygote and supervision thread, follow the hub, open the door for
        direct starts. Idempotent."""
        with self._boot_lock:
            if self._poller is None:
                try:
                    self._warm_up()
                except (ImportError, RuntimeError, OSError, concurrent.futures.TimeoutError) as exc:
                    return Refused(type(exc).__name__, f"{exc} (on Ray node {self._info})")
                self._poller = threading.Thread(
                    target=self._poll, name="procsup-agent-hub", daemon=True
                )
                self._poller.start()
                try:
                    self._door = Door(self._info.ip, self._direct)
                except OSError as exc:  # starts come by Ray alone
                    logger.warning("procsup: no direct channel on Ray node %s: %s", self._info, exc)
            door = self._door
        if door is None:
            return Ready(self._info, None, b"")
        return Ready(self._info, door.address, door.authkey)

    def _warm_up(self) -> None:
        record = self._backend.start(
            RunSpec(warm_up, "procsup agent warm-up", (), {}, self._root,
                    self._root.child_token(), DEFAULT, cancels_parent=False)
        )  # fmt: skip
        record.future.result(_BOOT_DEADLINE)

    @_in_group("control")
    def shutdown(self, timeout: float) -> bool:
        """Let go: stop what still runs at once, end the supervision thread and the zygote.

        Returns True once both have ended within ``timeout`` seconds.
        """
        with self._lock:
            self._closing = True
            records = [run.record for run in self._runs.values()]
            self._changed.notify_all()  # outcomes() returns None once the outbox is empty
        self._backend.close()
        if records:
            reason = "its RaySupervisor shut down"
            self._backend.stop(records, 0.0, reason, reason)
        door = self.close_door(min(timeout, _DOOR_DEADLINE))
        done = self._backend.join(timeout) and door
        self._watch.close(timeout)
        zygote.shutdown()
        with self._lock:
            self._changed.notify_all()
        return bool(done)

    @_in_group("control")
    def close_door(self, timeout: float) -> bool:
        """Take no more direct starts (the driver sends them by Ray instead); idempotent. True
        once the door's threads have ended within ``timeout`` seconds."""
        with self._lock:
            door = self._door
        return door is None or door.close(timeout)

    # ------------------------------------------------------------ runs

    def start(self, payload: bytes) -> bytes:
        """Start one run (a pickled ``StartRequest``); the pickled ``Started``, or ``Refused``
        (and no process) if it cannot be started here. A second copy of a start (the same run
        id, by Ray or the door) starts nothing: it gets the first one's answer."""
        reply, ack = self._answer(payload, "ray")
        if ack is not None:
            ack()  # Ray carries it to the driver, or the driver has given up on it
        return reply

    def _direct(self, payload: bytes) -> tuple[bytes, Callable[[], None] | None]:
        """A start from the door: its answer, kept until the driver's next request acks it."""
        return self._answer(payload, "direct")

    def _answer(self, payload: bytes, via: str) -> tuple[bytes, Callable[[], None] | None]:
        request: StartRequest = pickle.loads(payload)
        run_id = request.run_id
        with self._lock:
            first = run_id not in self._starts
            answer = self._starts.get(run_id)
            self._counts[via if first else "repeated"] += 1
            if first:
                answer = self._starts[run_id] = concurrent.futures.Future()
                self._trim_starts()
        ack = functools.partial(self._acked, run_id)
        if answer is None:  # its answer was read: a late copy, which the driver no longer reads
            return _REPEATED, None
        if not first:
            try:
                return answer.result(_REPEAT_DEADLINE), ack
            except concurrent.futures.TimeoutError:
                return _SLOW, None
        try:
            reply = pickle.dumps(self._start_run(request), pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            answer.set_exception(exc)  # a second copy raises it too
            raise
        answer.set_result(reply)
        return reply, ack

    def _acked(self, run_id: str) -> None:
        """The driver has the answer to this start: forget the answer, keep the run id."""
        with self._lock:
            if run_id in self._starts:
                self._starts[run_id] = None

    def _trim_starts(self) -> None:
        """Under the lock: forget the oldest answered starts beyond ``_STARTS_KEPT``."""
        for _ in range(len(self._starts) - _STARTS_KEPT):
            run_id, answer = next(iter(self._starts.items()))
            if answer is not None and not answer.done():
                self._starts.move_to_end(run_id)  # still starting: never forgotten
            else:
                del self._starts[run_id]

    @_in_group("control")
    def counts(self) -> dict[str, int]:
        """How many starts came by the door ("direct") and by Ray ("ray") first, and how many
        were second copies of a start ("repeated"): for tests and diagnosis."""
        with self._lock:
            return dict(self._counts)

    def _start_run(self, request: StartRequest) -> Started | Refused:
        run_id = request.run_id
        with self._lock:
            if run_id in self._discarded:  # the driver gave up on it before it came
                self._discarded.discard(run_id)
                return Refused("RuntimeError", "the driver gave up on this start")
            if self._lost is not None or self._closing:
                why = self._lost or "its RaySupervisor is shutting down"
                return Refused("RuntimeError", f"the procsup agent on Ray node {self._info}: {why}")
            cause = request.cause or self._early.pop(run_id, None)
        try:
            task_fn, args, kwargs = pickle.loads(request.call)
        except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
            return Refused(
                "TypeError",
                f"critical task {request.description!r} could not be started on Ray node "
                f"{self._info}: its function or arguments cannot be loaded there "
                f"({type(exc).__name__}: {exc})",
            )
        token = self._root.child_token()
        if cause is not None:
            token.cancel(cause)
        options = TaskOptions(
            memory_limit=request.memory_limit,
            cpu_time_limit=request.cpu_time_limit,
            capture_output=request.capture_output,
        )
        spec = RunSpec(
            task_fn=task_fn,
            description=request.description,
            args=tuple(args),
            kwargs=dict(kwargs),
            parent=self._root,  # never cancelled by the run: cancels_parent is the driver's
            token=token,
            options=options,
            cancels_parent=False,
        )
        try:
            record = self._start(spec, request.call if request.by_value else None)
        except (TypeError, ImportError, RuntimeError, ValueError, OSError) as exc:
            return Refused(type(exc).__name__, f"{exc} (on Ray node {self._info})")
        run = _Run(record, token, quiet=cause is not None, key=request.key, began=time.monotonic())
        waiter = None
        with self._lock:
            self._runs[run_id] = run
            discarded = run_id in self._discarded  # given up on while the zygote forked it
            self._discarded.discard(run_id)
            if self._quick.get(run.key, 0) and not discarded:
                waiter = run.waiter = concurrent.futures.Future()
        record.future.add_done_callback(functools.partial(self._done, run_id))
        if discarded:
            self.discard(run_id)
        if waiter is not None:
            concurrent.futures.wait((waiter,), _QUICK)
            with self._lock:  # from here on, the outcome goes to the outbox
                run.waiter = None
            if waiter.done():
                return Started(record.pid, waiter.result())
        watched = self._watch.watch(token, functools.partial(self._cancelled, run_id))
        with self._lock:
            if run_id in self._runs:
                run.watched = watched
            else:  # it ended meanwhile: its outcome says if it cancelled its token
                watched.cancel()
        return Started(record.pid)

    def _start(self, spec: RunSpec, blob: bytes | None) -> TaskRecord:
        """Start by reference, else by value (``blob``: the call as the driver pickled it)."""
        if blob is None:
            try:
                return self._backend.start(spec)
            except TypeError:
                # What plain pickle refuses after all (deep in the args): by value.
                try:
                    blob = pickled(spec.task_fn, spec.args, dict(spec.kwargs))
                except Exception as exc:
                    raise TypeError(
                        f"critical task {spec.description!r} could not be started: its "
                        f"function, args and kwargs must be serializable with cloudpickle ({exc})"
                    ) from exc
        return self._backend.start(
            dataclasses.replace(spec, task_fn=call_pickled, args=(blob,), kwargs={})
        )

    def _done(self, run_id: str, _: concurrent.futures.Future[Any]) -> None:
        """On the node's supervision thread: the run's outcome, to its start or the outbox."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            if run is None:
                return
            self._gone[run_id] = None
            while len(self._gone) > _ENDED_KEPT:
                self._gone.popitem(last=False)
            quick = time.monotonic() - run.began <= _QUICK
            self._quick[run.key] = ((self._quick.get(run.key, 0) << 1) | quick) & _LAST_RUNS
            self._quick.move_to_end(run.key)
            while len(self._quick) > _QUICK_KEPT:
                self._quick.popitem(last=False)
            watched = run.watched
        if watched is not None:
            watched.cancel()
        record = run.record
        outcome = encode(record.future, record.description, record.exitcode)
        if not run.quiet and run.token.is_cancelled():  # by the task itself
            outcome = dataclasses.replace(outcome, cancelled=run.token.cause or "cancelled")
        with self._lock:
            if run.waiter is not None:  # its start is waiting to answer with it
                run.waiter.set_result(outcome)
                return
            self._post(run_id, outcome)

    def _post(self, name: str, entry: Outcome | StopDone) -> None:
        """Under the lock: an entry for the outcomes poll."""
        self._seq += 1
        self._outbox.append((self._seq, name, entry))
        self._changed.notify_all()

    @_in_group("poll")
    def outcomes(self, acked: int) -> list[tuple[int, str, Outcome | StopDone]] | None:
        """The outcomes and done stops after ``acked``, waiting up to ``POLL_SECONDS`` for one;
        None once the agent has shut down. The driver keeps one such call pending: the agent's
        death fails it."""
        with self._lock:
            self._outbox = [entry for entry in self._outbox if entry[0] > acked]
            if not self._outbox and not self._closing:
                self._changed.wait(POLL_SECONDS)
            if self._closing and not self._outbox:
                return None
            return list(self._outbox)

    @_in_group("control")
    def discard(self, run_id: str) -> None:
        """The driver gave up on a start it sent (it did not answer in time): stop the run if it
        started after all."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                if run_id not in self._gone:
                    self._discarded.add(run_id)  # Ray may run this call before its start
                return
            run.quiet = True
        reason = "its start was given up by the driver"
        self._backend.stop([run.record], 0.0, reason, reason)

    @_in_group("control")
    def stop(self, request: StopRequest) -> bool:
        """Start the ladder for the runs named (the cancel is done when this returns); its
        ``StopDone`` comes on the outcomes poll."""
        records = []
        with self._lock:
            for run_id in request.run_ids:
                run = self._runs.get(run_id)
                if run is not None:
                    run.quiet = True
                    records.append(run.record)
        ladder = self._backend.stop(
            records, request.grace, request.cancel_reason, request.stop_reason,
            failure=request.failure,
        )  # fmt: skip
        ladder.done.add_done_callback(functools.partial(self._stop_done, request.stop_id))
        return True

    def _stop_done(self, stop_id: str, done: concurrent.futures.Future[list[str]]) -> None:
        with self._lock:
            self._post(stop_id, StopDone(tuple(done.result())))

    @_in_group("control")
    def facts(self, run_ids: list[str]) -> list[tuple[int | None, int | None, float | None]]:
        """Each run's process now: pid, RSS, CPU % (None where unknown)."""
        with self._lock:
            runs = [self._runs.get(run_id) for run_id in run_ids]
        answers: list[tuple[int | None, int | None, float | None]] = []
        for run in runs:
            if run is None:
                answers.append((None, None, None))
            else:
                facts = run.record.facts()
                answers.append((facts.pid, facts.rss, facts.cpu_percent))
        return answers

    # ------------------------------------------------------------ tokens

    def _cancelled(self, run_id: str, cause: str) -> None:
        """On the token watch's thread: tell the driver when the task cancelled its own token
        (the driver holds the original)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.quiet or self._lost is not None or self._closing:
                return
        self._hub.report.remote(self._key, [(run_id, cause)])

    def _cancel_from_driver(self, run_id: str, cause: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                if run_id not in self._gone:
                    self._early[run_id] = cause  # its start is on its way
                return
            run.quiet = True
        run.token.cancel(cause)

    def _poll(self) -> None:
        """The hub's long poll, on a thread of its own until the hub or the agent goes."""
        acked = 0
        while True:
            try:
                batch = ray.get(self._hub.agent_poll.remote(self._key, acked))
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
        cause = f"the procsup agent on Ray node {self._info} lost its driver: {why}"
        with self._lock:
            self._lost = why
            records = [run.record for run in self._runs.values()]
        logger.error("%s; stopping its %d tasks", cause, len(records))
        self._root.cancel(cause)
        if records:
            stop = f"its driver was lost and it did not honour cancellation within {self._grace} s"
            self._backend.stop(records, self._grace, cause, stop)
        self._backend.close()
        self.close_door(0.0)
