"""Items through workers: handing them out, taking them back, reading what comes back.

::

    queue ── _dispatch: idle workers first, then up to ``depth`` in each pipe ──▶ Dispatch
             (each under a node its worker named: borrow_node)
    the first Dispatch in a worker runs ── _promote: claim its future, start its deadline
    a worker idle, the queue empty ── _rebalance: cancel_unstarted() on a Dispatch waiting in
             another's pipe ── won: a ghost there (skipped), sent here; lost: it has started
    replies ── STARTED: it runs │ SKIPPED: it never ran │ DONE: _conclude ─▶ _publish
             (a return is decoded after the next items are out; a failure at once, so that
              critical=True cancels before anything more is sent)
    future.cancel() ── _cancel_item: queued: dropped │ waiting: taken back │ running: its node
             cancelled; grace_period later, still running: _kill (backend.stop, after taking
             back what waits behind it)
    deadline ── _timed_out: as a running cancel, and a TimeoutError whatever happens
    its worker died ── _orphaned: the one that said STARTED crashed; the others are queued again

This is the half of the engine that follows items; ``procsup._executor.pool.Pool`` completes it
with the threads, the workers' lives, and the executor as a whole. It runs on the executor's
thread only; what callers share is guarded by ``_lock`` (the queue, the flags).

Things that don't work
----------------------
- One item per worker at a time: each item then costs a wake-up of the executor's thread and
  one of the thread waiting on its future, and context switches were most of the executor's
  time on a 2-core machine (perf). With a few items in each worker's pipe, a wake-up reads
  several replies: 2,000 trivial items on 2 workers went from ~11,500 to ~20,000 items/s.
- ... without taking items back: an item waiting behind a long one while another worker idles
  (an item that waits for another one would wait for ever). Any worker that goes idle with
  nothing queued takes back an item that has not started, as a shared queue (CF's, pebble's)
  would have given it.
- A shared queue every worker reads (CF's call queue, pebble's channel): a worker killed while
  it holds the queue's lock stops them all (python/cpython#75158 is one such lock). A pipe per
  worker needs no lock, and the arena lock orders taking an item back against its start.
- Taking an item back by a message to its worker ("skip item 7"): the worker may have started
  it already, and it would run twice. ``cancel_unstarted()`` and the worker's ``child_token()``
  both hold the arena lock: exactly one of them wins.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

from procsup._executor import outcomes
from procsup._executor.workers import Dispatch, Item, Worker
from procsup._outcome import remote
from procsup._outcome.errors import BrokenExecutorError
from procsup._process import items
from procsup._process.worker import WorkerConfig
from procsup._supervision.options import TaskOptions
from procsup._supervision.runtime import Backend
from procsup._supervision.timers import Timers
from procsup._token.token import CancellationToken, borrow_node, cancel_unstarted

__all__ = ["Handout", "PoolConfig"]

logger = logging.getLogger("procsup")


@dataclass(frozen=True)
class PoolConfig:
    """An executor's settings, every one already validated (``procsup._executor.executor``)."""

    max_workers: int
    max_tasks_per_child: int | None
    timeout: float | None
    grace: float
    critical: bool
    worker: WorkerConfig
    initargs: tuple[Any, ...]  # the initializer's: each worker's start carries them
    options: TaskOptions


class Handout:
    """Follows items through workers (see the module docstring); the Pool provides the hooks.

    Invariants, under ``_lock``: ``_queue`` holds the items not in a worker (some may be
    cancelled: they are dropped when reached); ``_in_hand`` the item ``_next()`` took off it,
    until ``_send`` has put it in a worker's ``inflight``; ``_broken`` and ``_cancelled`` are set
    once and refuse new items; ``_idle`` counts the ready workers with nothing in flight (as of the
    thread's last look). The thread's own: ``_ready`` holds the workers that are ready and
    alive, in order of readiness, the spare aside (``_spare``); ``_answers`` the returns read in
    this turn of the loop and not published yet.
    """

    def __init__(self, backend: Backend, config: PoolConfig, token: CancellationToken) -> None:
        self.backend = backend
        self.config = config
        self.token = token
        self._lock = threading.Lock()
        self._queue: collections.deque[Item] = collections.deque()
        self._in_hand: Item | None = None
        self._broken: BrokenExecutorError | None = None
        self._cancelled: str | None = None
        self._idle = 0
        self._dispatches = itertools.count(1)
        self._ready: list[Worker] = []
        self._spare: Worker | None = None  # started, not counted, given nothing (Pool._replace)
        self._answers: list[tuple[Item, int, bytes]] = []

    # ---------------------------------------------------------------- what the Pool provides

    @property
    def _timers(self) -> Timers:
        raise NotImplementedError

    def _ending(self) -> bool:
        """Under the lock: no item will come (shut down, broken, or cancelled)."""
        raise NotImplementedError

    def _quit(self, worker: Worker) -> None:
        raise NotImplementedError

    def _watch_output(self, worker: Worker) -> None:
        raise NotImplementedError

    def _retire(self, worker: Worker) -> None:
        raise NotImplementedError

    def _fill(self, replace: int = 0) -> None:
        raise NotImplementedError

    def _replace(self) -> None:
        raise NotImplementedError

    def _critical(self, reason: str) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- handing items out

    def _dispatch(self) -> None:
        """Hand out what is queued. What each worker is sent in one call is written in one
        ``writev``: a write per item cost a GIL hand-off each (the syscall releases it, and the
        caller's thread, submitting, takes it), ~40% of this thread's time at 2,000 items."""
        corked = [worker for worker in self._ready if worker.open]
        for worker in corked:
            worker.cork()
        try:
            self._hand_out()
        finally:
            for worker in corked:
                if worker.uncork():
                    self._watch_output(worker)

    def _hand_out(self) -> None:
        ready = self._ready
        if self._queue:
            for worker in ready:  # idle workers first: an item waits for nobody
                if worker.open and not worker.inflight:
                    item = self._next()
                    if item is None:
                        break
                    self._send(worker, item)
            while self._queue:  # then the pipes, one more each per round
                sent = False
                for worker in ready:
                    if worker.open:
                        item = self._next()
                        if item is None:
                            break
                        self._send(worker, item)
                        sent = True
                if not sent:
                    break
        idle = [w for w in ready if w.open and not w.inflight]
        if idle and not self._queue:
            self._rebalance(idle)
            idle = [w for w in ready if w.open and not w.inflight]
        with self._lock:
            self._idle = len(idle)
            retire = self._ending() and not self._queue
        if retire:
            for worker in ready:
                self._quit(worker)  # after what it has in hand
            if self._spare is not None:
                self._quit(self._spare)

    def _next(self) -> Item | None:
        """The first queued item not cancelled (cancelled ones are dropped), in hand until
        ``_send`` has it in a pipe: ``shutdown(cancel_futures=True)`` looks in both."""
        with self._lock:
            while self._queue:
                item = self._queue.popleft()
                if item.future.pending():
                    self._in_hand = item
                    return item
        return None

    def _send(self, worker: Worker, item: Item) -> None:
        slot, live = worker.nodes.popleft()
        call = item.call
        dispatch = Dispatch(
            next(self._dispatches),
            item,
            worker,
            borrow_node(worker.token, slot, live),
            items.REQUEST.size + len(call),
        )
        item.dispatch = dispatch  # from here a cancel() cancels the node itself
        worker.inflight.append(dispatch)
        self._in_hand = None
        worker.served += 1
        if len(worker.inflight) == 1:  # before it is written: by then it may be running
            self._promote(worker)
        elif not item.future.pending():  # cancelled since _next(), before the line above
            dispatch.token.cancel(self._cancel_reasons(item)[0])
        if self.config.timeout == 0 and not item.timed_out:  # no time at all: never started
            item.timed_out = True
            reason = f"Executor item '{item.description}' timed out after 0 s"
            dispatch.token.cancel(reason)
            if self.config.critical:
                self._critical(reason)
        waiting = worker.send(items.REQUEST.pack(items.ITEM, dispatch.number, len(call)), call)
        limit = self.config.max_tasks_per_child
        if limit is not None and worker.served >= limit:
            waiting = worker.quit() or waiting
        if waiting:
            self._watch_output(worker)

    def _promote(self, worker: Worker) -> None:
        """The first dispatch in flight runs now: claim its future, start its deadline."""
        if not worker.inflight:
            return
        dispatch = worker.inflight[0]
        if dispatch.ghost or dispatch.running:
            return
        dispatch.running = True
        item = dispatch.item
        if not item.future.claim():  # cancelled while it waited: skipped there, or stopped
            self._stop_running(dispatch, *self._cancel_reasons(item))
            return
        timeout = self.config.timeout
        if timeout and not item.timed_out:
            item.deadline = self._timers.call_later(
                timeout, functools.partial(self._timed_out, item)
            )

    def _rebalance(self, idle: list[Worker]) -> None:
        """Idle workers, nothing queued: take back items waiting in other workers' pipes."""
        for worker in idle:
            victim = None
            for other in self._ready:
                for dispatch in itertools.islice(other.inflight, 1, None):
                    if not (dispatch.ghost or dispatch.kept or dispatch.running):
                        victim = dispatch
                        break
                if victim is not None:
                    break
            if victim is None:
                return
            if not cancel_unstarted(victim.token, "procsup.Executor moved the item"):
                victim.kept = True  # it runs there: we have not read the reply before it
                continue
            victim.ghost = True
            item = victim.item
            item.dispatch = None
            if item.future.pending():
                self._send(worker, item)

    # ---------------------------------------------------------------- outcomes

    def _answered(self, worker: Worker, kind: int, number: int, body: bytes) -> None:
        if not worker.inflight or worker.inflight[0].number != number:
            logger.error(
                "procsup.Executor: %s answered item %d out of order", worker.description, number
            )
            return
        dispatch = worker.inflight.popleft()
        self._promote(worker)  # the next one has started: its deadline runs from now
        if worker.quit_sent and not worker.inflight and worker.counted:
            self._retire(worker)  # max_tasks_per_child: it is leaving; another takes its place
            self._replace()
        if dispatch.ghost:
            return
        item = dispatch.item
        item.dispatch = None
        item.stop_timers()
        if kind == items.SKIPPED:
            self._skipped(item)
        elif remote.returned(body) and not item.timed_out:
            # Decoded once the next items are out (see _run): no worker waits for an unpickling
            # or for the wake-up of whoever waits on the future.
            self._answers.append((item, worker.pid, body))
        else:  # a failure, at once: critical=True must cancel before anything else is sent
            self._conclude(item, worker.pid, body)

    def _skipped(self, item: Item) -> None:
        """Its token was cancelled before it started, and it did not run."""
        if item.timed_out:
            self._publish(item, None, outcomes.timed_out(item.description, self._timeout(), None))
        else:  # the executor's token was cancelled: what had not started is cancelled
            item.future.cancel()

    def _conclude(self, item: Item, pid: int, body: bytes) -> None:
        value, error = outcomes.reported(item.description, pid, body)
        if item.timed_out:
            value, error = None, outcomes.timed_out(item.description, self._timeout(), error)
        self._publish(item, value, error)

    def _publish_answers(self) -> None:
        answers, self._answers = self._answers, []
        for item, pid, body in answers:
            self._conclude(item, pid, body)

    def _publish(self, item: Item, value: Any, error: BaseException | None) -> None:
        item.call = b""
        if item.future.cancelled():
            return
        if error is not None and self.config.critical:
            self._critical(outcomes.cause(item.description, error))  # before it is published
        item.future.settle(value, error)

    # ---------------------------------------------------------------- cancel, timeout, kill

    def _timeout(self) -> float:
        return self.config.timeout or 0.0

    def _cancel_reasons(self, item: Item) -> tuple[str, str, bool]:
        grace = self.config.grace
        return (
            f"Executor item '{item.description}' was cancelled",
            f"its future was cancelled and it did not return within {grace:g} s",
            False,
        )

    def _cancel_item(self, item: Item) -> None:
        """Its future was cancelled (posted by ``ItemFuture.cancel``)."""
        dispatch = item.dispatch
        if dispatch is None or dispatch.ghost:
            return  # queued (dropped when reached), or ended
        reason, why, failure = self._cancel_reasons(item)
        if dispatch.running:
            self._stop_running(dispatch, reason, why, failure)
        elif not dispatch.kept:  # waiting in a worker's pipe: take it back
            if cancel_unstarted(dispatch.token, reason):
                dispatch.ghost = True  # its worker skips it
                item.dispatch = None
            else:
                dispatch.kept = True  # _promote stops it
                dispatch.token.cancel(reason)

    def _timed_out(self, item: Item) -> None:
        dispatch = item.dispatch
        if dispatch is None or not dispatch.running or item.timed_out:
            return
        item.timed_out = True
        timeout, grace = self._timeout(), self.config.grace
        reason = f"Executor item '{item.description}' timed out after {timeout:g} s"
        if self.config.critical:
            self._critical(reason)
        why = (
            f"it exceeded its timeout of {timeout:g} s and did not honour cancellation within "
            f"{grace:g} s"
        )
        self._stop_running(dispatch, reason, why, True)

    def _stop_running(self, dispatch: Dispatch, reason: str, why: str, failure: bool) -> None:
        """Cancel a running item's token; if it still runs ``grace_period`` later, its worker
        goes down the backend's ladder (SIGTERM, then SIGKILL)."""
        dispatch.token.cancel(reason)
        item = dispatch.item
        if item.kill is None:
            item.kill = self._timers.call_later(
                self.config.grace, functools.partial(self._kill, dispatch, why, failure)
            )

    def _kill(self, dispatch: Dispatch, why: str, failure: bool) -> None:
        worker = dispatch.worker
        if worker.dead or not worker.inflight or worker.inflight[0] is not dispatch:
            return  # it returned meanwhile
        worker.doomed = True  # whatever happens next, it gets nothing more
        self._quit(worker)
        self._take_back(worker)  # before the ladder cancels their nodes with the worker's token
        cancel_reason = f"procsup.Executor stopped {worker.description}"
        self.backend.stop([worker.run], 0.0, cancel_reason, why, failure=failure)

    def _take_back(self, worker: Worker, head: bool = False) -> None:
        """The items waiting in ``worker``'s pipe (and, with ``head``, the first one too, unless
        it said STARTED) go back to the queue, in order, if they have not started."""
        back = []
        for i, dispatch in enumerate(list(worker.inflight)):
            if (i == 0 and not head) or dispatch.ghost or dispatch.kept or dispatch.began:
                continue
            if not cancel_unstarted(dispatch.token, "procsup.Executor moved the item"):
                dispatch.kept = True
                continue
            dispatch.ghost = True
            item = dispatch.item
            item.dispatch = None
            item.stop_timers()
            if item.timed_out:  # timeout=0, or it never got to start before its deadline
                self._publish(
                    item, None, outcomes.timed_out(item.description, self._timeout(), None)
                )
            elif item.future.unclaim() or item.future.pending():
                back.append(item)
        if back:
            with self._lock:
                self._queue.extendleft(reversed(back))

    def _orphaned(
        self, worker: Worker, inflight: list[Dispatch], error: BaseException | None, received: int
    ) -> bool:
        """``worker`` died with ``inflight``: the one it had said STARTED for crashed, the others
        go back to the queue. Returns whether it had any item."""
        requeue = []
        for i, dispatch in enumerate(inflight):
            if dispatch.ghost:
                continue
            item = dispatch.item
            item.dispatch = None
            item.stop_timers()
            if i == 0 and dispatch.began:  # it ran, and its worker died under it
                failure = outcomes.crashed(item.description, worker.description, error, received)
                logger.info("%s", failure)  # the backend logged it quietly, as the worker's
                if item.timed_out:
                    failure = outcomes.timed_out(item.description, self._timeout(), failure)
                self._publish(item, None, failure)
            elif item.timed_out:  # timeout=0: it would never have run
                self._publish(item, None, outcomes.timed_out(item.description, 0.0, None))
            elif item.future.unclaim() or item.future.pending():
                requeue.append(item)  # it never started: another worker runs it
        if requeue:
            with self._lock:
                self._queue.extendleft(reversed(requeue))
        return bool(inflight)
