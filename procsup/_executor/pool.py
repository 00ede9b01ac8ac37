"""The executor's engine: its threads, its workers' lives, and the executor as a whole.

::

    caller threads                      "procsup-executor" thread           workers (runs of
    ──────────────                      ─────────────────────────           the Backend)
    submit(): dumps_call (TypeError);   Loop.turn() (procsup._executor.loop): epoll on the
      queue.append; wake it if it         wake-up pipe, each worker's results pipe, and its
      sleeps; the first submits start     tasks pipe while a call waits to be written
      workers (errors raise there)      items (procsup._executor.handout): handed out, taken
    future.cancel() ─ event ─────────▶    back, their replies read, outcomes published
    EOF on a worker's results pipe ───▶ _lost(): take back what it had not started; a
                                          replacement: "procsup-executor-start" thread ─▶
                                          backend.start() ─ event: adopt it
    run.future done (backend thread)    its death: drain its pipe, _orphaned(): the item it
      ─ event ────────────────────────▶   had STARTED crashed (the crash record is in hand)
    "procsup-executor-token" thread: waits on a child of the executor's token; cancelled
      ─ event ────────────────────────▶ cancel what has not started, QUIT every worker,
                                          backend.stop(the busy ones, grace_period)
    shutdown(): closing; cancel_futures ▶ queue empty: QUIT every worker; all ended:
      joins the three threads             backend.close() and join(); the thread returns

Everything about workers and items belongs to the thread; callers share only what ``_lock``
guards: the queue, the flags that refuse new items, and the counts that decide whether a submit
starts a worker.

Things that don't work
----------------------
- Polling for results (pebble's pool loops with timeouts): the thread sleeps in ``epoll`` until a
  pipe, an event or the next deadline needs it, and costs nothing while items run.
- Learning of a worker's death only from EOF on its pipe (CF's ProcessPoolExecutor watches
  sentinels, then breaks the whole pool): under fork the other workers hold copies of its write
  end, and EOF carries no crash record. The run's outcome, decided by the backend, fails the
  item the worker had started. EOF, where it comes, only starts the replacement sooner.
- ... and only from the run's outcome: the backend's thread must take the GIL from this busy
  one to reap, read the crash record and publish, 2-5 ms after a SIGKILL on a loaded 2-core
  machine, during which the pool is a worker short. EOF is seen at once.
- Noticing the executor's token in the thread's wait: a token is a futex word, which epoll
  cannot watch. One small thread blocks on a child of it (so ``shutdown()`` can wake it without
  cancelling the user's token) and turns a cancellation into an event.
- Starting workers on the thread: a start takes milliseconds (a zygote round trip), and every
  other worker's pipe runs dry meanwhile; one crash among a thousand trivial items cost a third
  of the throughput. Replacements start on a "procsup-executor-start" thread.
- Starting every worker there: a start error (``initargs`` that cannot be pickled for the start
  method) would then fail futures instead of raising from ``submit()``, as CF raises. The
  workers a submit needs start in the submit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import queue
import select
import threading
from collections.abc import Callable, Mapping
from typing import Any

from procsup._executor import outcomes
from procsup._executor.future import ItemFuture
from procsup._executor.handout import Handout, PoolConfig
from procsup._executor.loop import Loop
from procsup._executor.workers import Item, Worker, start_worker
from procsup._os.tree import KILL_WAIT, REAP_DEADLINE
from procsup._outcome.errors import BrokenExecutorError
from procsup._process import items
from procsup._supervision.runtime import Backend
from procsup._supervision.timers import Timers
from procsup._token.token import CancellationToken

__all__ = ["Pool", "PoolConfig"]

logger = logging.getLogger("procsup")

_READS_PER_WAKE = 16  # chunks per pipe per wake-up: one chatty worker cannot starve the others


class Pool(Handout):
    """The engine behind one ``procsup.Executor``; see the module docstring.

    Invariants, under ``_lock``: ``_queue`` holds the items not in a worker (some may be
    cancelled: they are dropped when reached); ``_closing``, ``_broken`` and ``_cancelled`` are
    set once and refuse new items; ``_live`` counts the workers that count toward
    ``max_workers`` (starting, running, not retired, not dead), ``_starting`` those not ready
    yet, ``_idle`` the ready ones with nothing in flight (as of the thread's last look).

    The thread's own: ``_loop`` (``procsup._executor.loop``: its wait, fds and timers);
    ``_workers`` (results fd -> worker) holds every adopted worker until its death is handled,
    the spare included; ``_spare_wanted`` once a worker had to be replaced (then a spare is kept:
    ``_replace``), ``_spare_starting`` while the starter thread starts one.
    """

    def __init__(self, backend: Backend, config: PoolConfig, token: CancellationToken) -> None:
        super().__init__(backend, config, token)
        self._closing = False
        self._live = 0
        self._starting = 0
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        # What the starter thread is asked to start: a worker, a spare; None: it returns.
        self._starts: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._spare_wanted = False  # once a worker has had to be replaced
        self._spare_starting = False
        self._items = itertools.count(1)
        self._numbers = itertools.count(1)
        self._loop: Loop | None = None  # made with the thread, on the first submit
        self._workers: dict[int, Worker] = {}
        self._pid = os.getpid()  # a copy forked into another process is inert

    # ---------------------------------------------------------------- any thread

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        description: str,
    ) -> ItemFuture[Any]:
        """Queue ``fn(*args, **kwargs)``; see ``Executor.submit``."""
        self._refuse_in_a_copy()  # before the lock: another thread may have held it at the fork
        item = Item(next(self._items), description, items.dumps_call(fn, args, kwargs))
        item.future = future = ItemFuture[Any](functools.partial(self._cancelled_by_user, item))
        with self._lock:
            self._refuse()
            self._boot()
            self._queue.append(item)
            start = self._wants_worker()
        assert self._loop is not None
        self._loop.wake()
        if start:
            self._start_for(item)
        return future

    def _copied(self) -> bool:
        """Whether this is a copy in a process forked from the owner: its threads did not come
        along (nothing would run an item), its workers and items are the owner's, and its lock
        may have been held at the fork (checked before taking it)."""
        return os.getpid() != self._pid

    def _refuse_in_a_copy(self) -> None:
        if self._copied():
            raise RuntimeError(
                "a procsup.Executor cannot be used in a process forked from its owner"
            )

    def _refuse(self) -> None:
        """Under the lock: raise if no item may be submitted now."""
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise RuntimeError("cannot schedule new futures after shutdown")
        cause = self._cancelled
        if cause is None and self.token.is_cancelled():
            cause = self.token.cause
        if cause is not None:
            raise RuntimeError(
                f"cannot schedule new futures: the executor's token was cancelled ({cause})"
            )

    def _wants_worker(self) -> bool:
        """Under the lock: whether the queue outgrows the workers that could take it (and the
        limit allows one more); if so, count the one about to start."""
        spare = self._idle + self._starting
        if self._live >= self.config.max_workers or len(self._queue) <= spare:
            return False
        self._live += 1
        self._starting += 1
        return True

    def _start_for(self, item: Item) -> None:
        """In a submit: start a worker; if none can start and none is left, the submit raises."""
        try:
            worker = self._start()
        except BaseException as exc:
            with self._lock:
                self._live -= 1
                self._starting -= 1
                alone = self._live == 0
                if alone:  # nobody could ever run it: take it back
                    item.future.claim()
                    with contextlib.suppress(ValueError):
                        self._queue.remove(item)
            if not alone and isinstance(exc, Exception):
                logger.warning("procsup.Executor could not start a worker process: %s", exc)
                return
            if isinstance(exc, TypeError):
                raise TypeError(
                    f"procsup.Executor could not start a worker process: {exc}"
                ) from exc
            raise
        self._post(functools.partial(self._adopt, worker))

    def _start(self) -> Worker:
        config = self.config
        return start_worker(
            self.backend,
            next(self._numbers),
            self.token,
            config.worker,
            config.initargs,
            config.options,
        )

    def _cancelled_by_user(self, item: Item) -> None:
        """In the thread that cancelled its future, before ``cancel()`` returns: an item sent to
        a worker has its node cancelled now, so that it never starts if it has not yet (the
        worker marks a start under the arena lock, which carries out the cancel first). The rest
        (taking it back, or stopping it) is the thread's. A copy of the future in a forked child
        cancels nothing: the item and its node are the owner's."""
        if self._copied():
            return
        dispatch = item.dispatch  # the thread's; a snapshot is enough (see _send)
        if dispatch is not None:
            dispatch.token.cancel(f"Executor item '{item.description}' was cancelled")
        self._post(functools.partial(self._cancel_item, item))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Refuse new items; with ``cancel_futures``, cancel those not started; workers end once
        nothing waits. ``wait``: return once everything has ended (idempotent)."""
        if self._copied():
            return
        with self._lock:
            self._closing = True
            thread, watcher, starter = self._thread, self._watcher, self._starter
            queued = [*self._queue, self._in_hand] if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for item in queued:  # and the one in hand, if any: pending only, it may have run since
            if item is not None:
                item.future.cancel_pending()
        if cancel_futures:  # and those waiting in pipes (C-level copies: safe from any thread)
            for worker in list(self._workers.values()):
                for dispatch in list(worker.inflight):
                    dispatch.item.future.cancel_pending()
        if thread is None or watcher is None or starter is None:  # never used
            self.backend.close()
            return
        self._post(_nothing)  # the thread retires the idle workers
        if wait and threading.current_thread() not in (thread, watcher, starter):
            for each in (thread, watcher, starter):
                each.join()

    def counts(self) -> tuple[int, int]:
        """``(workers, items waiting)`` now, for ``repr``."""
        if self._copied():
            return 0, 0
        with self._lock:
            return self._live, len(self._queue)

    def _post(self, event: Callable[[], None]) -> None:
        """Have the thread run ``event`` (in order, soon); only once it exists."""
        assert self._loop is not None
        self._loop.post(event)

    @property
    def _timers(self) -> Timers:
        assert self._loop is not None
        return self._loop.timers

    def _boot(self) -> None:
        """Under the lock, on the first submit: the thread, its fds, the token's watcher."""
        if self._thread is not None:
            return
        self._loop = Loop()
        watch = self.token.child_token()  # cancelled by the token, or by us when we are done
        self._thread = threading.Thread(target=self._run, args=(watch,), name="procsup-executor")
        self._watcher = threading.Thread(
            target=self._await_token, args=(watch,), name="procsup-executor-token"
        )
        self._starter = threading.Thread(target=self._start_workers, name="procsup-executor-start")
        for thread in (self._thread, self._watcher, self._starter):
            thread.daemon = True  # interpreter exit: see _shutdown_all
        _LIVE.add(self)
        self._thread.start()
        self._watcher.start()
        self._starter.start()

    def _await_token(self, watch: CancellationToken) -> None:
        watch.wait()
        if self.token.is_cancelled():
            self._post(self._token_cancelled)

    # ---------------------------------------------------------------- the thread

    def _run(self, watch: CancellationToken) -> None:
        assert self._loop is not None
        try:
            while True:
                self._loop.turn(self._has_work)
                self._dispatch()
                self._publish_answers()  # after the next items are out: workers wait for nothing
                if not self._queue:  # idle CPU, now: a spare costs the items nothing
                    self._want_spare()
                if self._finished():
                    return
        except BaseException:
            logger.exception("procsup.Executor's thread died; its items are failed")
            self._lose()
        finally:
            self._close(watch)

    def _has_work(self) -> bool:
        """Whether a queued item could be sent now (then the thread must not sleep)."""
        return bool(self._queue) and any(worker.open for worker in self._ready)

    def _finished(self) -> bool:
        if self._workers or self._spare_starting:  # a spare counts toward no limit: wait for it
            return False
        with self._lock:
            return self._ending() and self._live == 0 and not self._queue

    def _ending(self) -> bool:
        return self._closing or self._broken is not None or self._cancelled is not None

    def _close(self, watch: CancellationToken) -> None:
        self.backend.close()
        if not self.backend.join(KILL_WAIT if self.backend.live() else REAP_DEADLINE):
            logger.error("procsup.Executor: its workers' supervision thread did not end")
        assert self._loop is not None
        self._loop.close()
        for worker in self._workers.values():  # only if the thread died: they were stopped
            worker.close()
        watch.cancel("procsup.Executor shut down")  # the watcher returns
        self._starts.put(None)  # and the starter (no start is under way: see _finished)
        _LIVE.discard(self)

    def _watch_output(self, worker: Worker) -> None:
        """A call waits to be written to ``worker``: write it as its pipe takes it."""
        assert self._loop is not None
        if worker.tasks_fd >= 0 and not self._loop.watching(worker.tasks_fd):
            self._loop.watch(
                worker.tasks_fd, functools.partial(self._flush, worker), select.EPOLLOUT
            )

    def _flush(self, worker: Worker) -> None:
        if not worker.flush():
            assert self._loop is not None
            self._loop.unwatch(worker.tasks_fd)

    # ---------------------------------------------------------------- workers

    def _adopt(self, worker: Worker, spare: bool = False) -> None:
        if spare:
            self._spare_starting = False
            self._spare = worker
            worker.spare = True
            worker.counted = False  # not toward max_workers until it replaces one
        self._workers[worker.results_fd] = worker
        assert self._loop is not None
        self._loop.watch(
            worker.results_fd, functools.partial(self._receive, worker, _READS_PER_WAKE)
        )
        # After it is watched: a run that has already ended posts its death behind this event.
        worker.run.future.add_done_callback(
            lambda _: self._post(functools.partial(self._died, worker))
        )
        if self._broken is not None or self._cancelled is not None or (spare and self._closing):
            self._quit(worker)

    def _receive(self, worker: Worker, budget: int | None) -> None:
        if worker.results_fd < 0:
            return
        still_open = worker.receive(budget)
        for kind, number, body in worker.replies():
            if kind == items.STARTED:
                if worker.inflight and worker.inflight[0].number == number:
                    worker.inflight[0].began = True
            elif kind == items.DONE or kind == items.SKIPPED:
                self._answered(worker, kind, number, body)
            elif kind == items.READY:
                worker.ready = True
                if not worker.spare:
                    with self._lock:
                        self._starting -= 1
                    self._ready.append(worker)
            elif kind == items.INIT_FAILED:
                worker.quit_sent = True  # it returns on its own
                self._break(outcomes.init_failed(worker.description, worker.pid, body))
        if not still_open:  # every writer is gone: its death is on the way
            assert self._loop is not None
            self._loop.unwatch(worker.results_fd)
            self._lost(worker)

    def _lost(self, worker: Worker) -> None:
        """End of file on its results pipe: it died (its outcome, with the crash record, comes
        later: the backend's thread reaps it) or can answer nothing more. What it had not
        started is taken back and a replacement started now, not milliseconds later."""
        if worker.lost or worker.dead:
            return
        worker.lost = worker.doomed = True  # it gets nothing more
        if self._spare is worker:
            self._spare = None
        if worker in self._ready:
            self._ready.remove(worker)
        self._take_back(worker, head=True)
        # One that dies before it is ready may break the executor: _died decides.
        if worker.ready and not worker.spare:
            self._retire(worker)
            if not worker.quit_sent:
                self._replace()

    def _quit(self, worker: Worker) -> None:
        if not worker.dead and worker.quit():
            self._watch_output(worker)

    def _retire(self, worker: Worker) -> None:
        """It counts toward ``max_workers`` no more (it is leaving, or gone)."""
        with self._lock:
            if worker.counted:
                worker.counted = False
                self._live -= 1

    def _died(self, worker: Worker) -> None:
        """Its run's outcome is in (it has been reaped): what it wrote is all in the pipe."""
        if worker.dead:
            return
        if worker.results_fd >= 0:
            worker.drain()
        self._receive(worker, 0)
        worker.dead = True
        self._retire(worker)
        if self._spare is worker:
            self._spare = None
        if not worker.ready and not worker.spare:
            with self._lock:
                self._starting -= 1
        if worker in self._ready:
            self._ready.remove(worker)
        assert self._loop is not None
        self._loop.unwatch(worker.results_fd)
        self._loop.unwatch(worker.tasks_fd)
        del self._workers[worker.results_fd]
        error = worker.run.future.exception()
        inflight = list(worker.inflight)
        received = worker.partial()
        worker.inflight.clear()
        worker.close()
        orphans = self._orphaned(worker, inflight, error, received)
        if not orphans and not worker.ready and not worker.quit_sent and not self._cancelled:
            # Its initializer crashed, or the process could not even start Python (a memory
            # limit too small, say): every replacement would do the same.
            self._break(outcomes.broken(f"{worker.description} died before it was ready: {error}"))
        if worker.quit_sent or worker.lost or worker.spare:
            self._fill()  # for what is queued, if need be
        else:
            self._replace()

    def _replace(self) -> None:
        """A worker has left (it died, or reached ``max_tasks_per_child``): the spare takes its
        place at once if one is ready, else one is started; and, from now on, a spare is kept.

        A start costs milliseconds during which the pool is a worker short: one crash among a
        thousand trivial items cost ~15% of their throughput on a loaded 2-core machine. The
        spare is an idle worker beyond ``max_workers``, kept only once replacements happen
        (crashy items, ``max_tasks_per_child``), as procsup's zygote keeps a child forked ahead.
        A new spare starts once the queue is empty (``_run``), not at once: its start takes a
        core's milliseconds from the items while they queue (measured, medians of 40 runs of 1
        crash among 1,000 items against none: 0.89-0.97x the crash-free throughput starting it
        at once, 0.98-1.01x once the queue is empty).
        """
        self._spare_wanted = True
        spare = self._spare
        with self._lock:
            free = not self._ending() and self._live < self.config.max_workers
            if free and spare is not None and spare.ready and not spare.doomed:
                self._live += 1
            else:
                spare = None
        if spare is None:
            self._fill(replace=1)
        else:
            self._spare = None
            spare.spare = False
            spare.counted = True
            self._ready.append(spare)

    def _want_spare(self) -> None:
        if not self._spare_wanted or self._spare is not None or self._spare_starting:
            return
        with self._lock:
            if self._ending():
                return
        self._spare_starting = True
        self._starts.put("spare")

    def _fill(self, replace: int = 0) -> None:
        """Have workers started (by the starter thread) for what waits, and ``replace`` more,
        within the limit."""
        while True:
            with self._lock:
                if self._broken is not None or self._cancelled is not None:
                    return
                queued = len(self._queue)
                if self._closing and not queued:
                    return
                if self._live >= self.config.max_workers:
                    return
                if replace <= 0 and queued <= self._idle + self._starting:
                    return
                self._live += 1
                self._starting += 1
            replace -= 1
            self._starts.put("worker")

    def _start_workers(self) -> None:
        """The starter thread: a start takes milliseconds, which this thread would otherwise
        take from every other worker's items (a crash would stall the pool)."""
        while (kind := self._starts.get()) is not None:
            spare = kind == "spare"
            try:
                worker = self._start()
            except Exception as exc:  # noqa: BLE001 - reported (or breaks the executor) there
                self._post(functools.partial(self._start_failed, exc, spare))
            else:
                self._post(functools.partial(self._adopt, worker, spare))

    def _start_failed(self, exc: Exception, spare: bool = False) -> None:
        if spare:  # no harm done: a replacement will start the slow way
            self._spare_starting = False
            logger.warning("procsup.Executor could not start a spare worker process: %s", exc)
            return
        with self._lock:
            self._live -= 1
            self._starting -= 1
            alone = self._live == 0
        if not alone:
            logger.warning("procsup.Executor could not start a worker process: %s", exc)
            return
        error = outcomes.broken(f"no worker process could be started: {exc}")
        error.__cause__ = exc
        self._break(error)

    # ---------------------------------------------------------------- the executor as a whole

    def _critical(self, reason: str) -> None:
        """``critical=True``: a failure cancels the executor's token, and everything with it."""
        if not self.token.is_cancelled():
            self.token.cancel(reason)
        self._token_cancelled()

    def _token_cancelled(self) -> None:
        if self._cancelled is not None or not self.token.is_cancelled():
            return
        cause = self.token.cause or "cancelled"
        with self._lock:
            self._cancelled = cause
            queued = list(self._queue)
            self._queue.clear()
        for item in queued:
            item.future.cancel()
        busy = []
        for worker in list(self._workers.values()):
            self._quit(worker)
            for dispatch in list(worker.inflight):
                if not dispatch.ghost:
                    dispatch.item.future.cancel_pending()  # not started: skipped there
            if any(d.running for d in worker.inflight) and not worker.dead:
                busy.append(worker.run)
        if busy:
            grace = self.config.grace
            self.backend.stop(
                busy,
                grace,
                f"procsup.Executor's token was cancelled: {cause}",
                f"the executor's token was cancelled ({cause}) and it did not return within "
                f"{grace:g} s",
            )

    def _break(self, error: BrokenExecutorError) -> None:
        """No item will run any more: those waiting fail with ``error``, and so will submits."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = error
            queued = list(self._queue)
            self._queue.clear()
        logger.error("%s", str(error).splitlines()[0])
        for item in queued:
            if item.future.claim():
                item.future.settle(error=error)
        for worker in list(self._workers.values()):
            self._quit(worker)  # those with items finish them first
        if self.config.critical:
            self._critical(str(error).splitlines()[0])

    def _lose(self) -> None:
        """The thread is dying of a bug: fail every item, stop every worker."""
        with contextlib.suppress(Exception):
            self._publish_answers()
        lost = outcomes.broken("its thread died (see the log)")
        with self._lock:
            self._broken = self._broken or lost
            queued = list(self._queue)
            self._queue.clear()
        running = [d.item for w in self._workers.values() for d in w.inflight if not d.ghost]
        for item in [*queued, *running]:
            with contextlib.suppress(Exception):
                item.future.claim()
                item.future.settle(error=lost)
        runs = [w.run for w in self._workers.values() if not w.dead]
        if runs:
            with contextlib.suppress(Exception):
                self.backend.stop(runs, 0.0, "procsup.Executor's thread died", "its thread died")
                for run in runs:
                    run.future.exception(REAP_DEADLINE)


_LIVE: set[Pool] = set()  # booted and not ended: interpreter exit shuts them down


def _shutdown_all() -> None:
    # As CF does at exit: what was submitted still runs (shutdown(wait=True)); then every
    # worker has ended and been reaped before the interpreter goes.
    for pool in list(_LIVE):
        pool.shutdown(wait=True)


def _forget_after_fork() -> None:
    _LIVE.clear()  # their threads did not come along


def _nothing() -> None:
    pass


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
