"""``procsup.Executor``: a ``concurrent.futures`` executor whose items run in supervised workers.

::

    Executor(...)            validate; a LocalBackend (the runtime seam's local processes);
                             a Pool (procsup._executor.pool): nothing starts until a submit
    submit(fn, *args)        Pool.submit: pickle the call, queue it, start a worker if needed
    map(fn, *its, timeout,   submit each call (a chunk of calls per item for chunksize > 1);
        chunksize)           yield results in order; on timeout, cancel what is left
    shutdown(wait, cancel_futures)
                             Pool.shutdown: no new items; workers end once the queue is empty
    garbage collected        the Pool is shut down (without waiting); at interpreter exit every
                             live Pool is shut down and waited for (procsup._executor.pool)

This is the only module of the executor that names the local backend: the engine below reaches
processes through the runtime protocol (``procsup._supervision.runtime``) alone.

Things that don't work
----------------------
- ``concurrent.futures.Executor.map`` as inherited: it cannot batch (``chunksize``), and a
  submit that raises in the middle of it (an argument that cannot be pickled) leaves the items
  already submitted running for nobody. They are cancelled here.
- A ``weakref.finalize`` that refers to the executor, or a Pool that does: the executor would
  never be collected. The finalizer and the Pool's thread hold the Pool only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from procsup._executor.future import ItemFuture
from procsup._executor.pool import Pool, PoolConfig
from procsup._os.timeouts import check_timeout
from procsup._process import items
from procsup._process.worker import WorkerConfig, run_chunk
from procsup._supervision.local import OWN_PRELOAD, LocalBackend, LocalConfig
from procsup._supervision.options import check_options
from procsup._token.token import CancellationToken

__all__ = ["Executor"]

P = ParamSpec("P")
T = TypeVar("T")

# Items in a worker's pipe at once, the running one included (procsup._executor.pool). Measured
# here, 2,000 trivial items on 2 workers: depth 1 ~11,500 items/s, 2 ~11,500, 4 ~18,000-22,800
# (pebble's reused pool ~13,000-17,500 in the same runs). Deeper pipes matter while items are
# being submitted: the submitting thread holds the GIL, and the executor's thread gets it back
# after each syscall only at the switch interval (5 ms), so what it hands out per turn is what
# the workers have to run until its next turn. Per item against pebble, 2,000 items submitted at
# once, 6 runs interleaved at a load of ~10: depth 4 0.81-0.97x, 16 0.52-0.96x, 32 0.50-0.72x,
# 64 0.57-0.67x. A node is made ahead for each (two arena slots per item in the pipe).
_DEPTH = 32


class Executor(concurrent.futures.Executor):
    """Runs calls in a pool of supervised worker processes; a crash fails only its own item.

    A ``concurrent.futures.Executor``: ``submit`` returns ``concurrent.futures.Future`` objects
    (``wait``, ``as_completed``, done callbacks and ``loop.run_in_executor`` work), ``map``
    yields results in order, and ``with`` shuts it down. Each item runs under its own token, a
    descendant of ``token``; inside the item, ``procsup.current_token()`` returns it.

    Outcomes, as ``future.result()`` gives them:

    - the item returned: its value;
    - it raised an ``Exception``: that exception, rebuilt with the worker's traceback (a
      ``TaskFailedError`` whose cause is a ``RemoteTraceback`` if it could not be pickled);
    - it raised another ``BaseException`` (``SystemExit(3)``, ``KeyboardInterrupt``):
      ``TaskPanickedError``; ``SystemExit(0)`` and ``SystemExit(None)`` return None;
    - its worker died while running it (a signal, ``os._exit``, the OOM killer):
      ``TaskCrashedError`` with the worker's crash record (signal, exit code, peak RSS, stderr
      tail, faulthandler dump). The worker is replaced; every other item goes on. An item sent
      to a worker that dies before starting it does not fail: another worker runs it.
    - its return value cannot be pickled: ``pickle.PicklingError`` (the worker goes on);
    - past ``timeout``: the builtin ``TimeoutError``, its cause what ended the item;
    - ``future.cancel()``: ``CancelledError``, running or not. An item cancelled before it
      started never runs; a running one has its token cancelled, and its worker is killed if
      it has not returned ``grace_period`` seconds later.

    Each worker holds up to 4 items in its pipe (fewer round trips); a worker that goes idle
    takes back an item that has not started from another's, so no item waits behind a long one
    while a worker is free, as with CF's shared queue.

    Args:
        max_workers: Worker processes running items at most; None means ``os.cpu_count()``.
            Workers start as items need them and are replaced when they die. Once one has had to
            be replaced (a crash, ``max_tasks_per_child``), one more is kept started and idle, a
            spare that takes the next one's place at once.
        start_method: "forkserver" (procsup's zygote; the default), "spawn" or "fork".
        max_tasks_per_child: Items a worker runs before it is replaced by a fresh one; None: no
            limit.
        initializer, initargs: ``initializer(*initargs)`` runs in each worker before its first
            item. ``initargs`` travel with the worker's start, so tokens, Connections and
            multiprocessing locks may be among them (not in an item's args). If it raises, the
            executor is broken: items waiting fail with ``BrokenExecutorError`` (its message
            carries the initializer's traceback), and so does every later ``submit``.
        timeout: Seconds each item may run. At the deadline its token is cancelled; if it has not
            returned ``grace_period`` seconds later, its worker is killed (SIGTERM, then SIGKILL
            a second later). The future raises ``TimeoutError`` either way. None: no limit.
        memory_limit: Bytes of private writable memory per worker (``RLIMIT_DATA``, as in
            ``spawn()``); an item that goes over raises ``MemoryError`` ("memory limit
            exceeded"), and the worker goes on.
        critical: The seed's semantics for a pool: the first item that fails, panics, crashes or
            times out cancels ``token`` (its cause names the item) before its future is
            published. Cancelling ``token`` from outside does the same, critical or not: running
            items see their tokens cancelled and get ``grace_period`` to return before their
            workers are stopped, waiting items are cancelled, and ``submit`` raises
            ``RuntimeError`` naming the cause.
        token: The executor's token (a new root if None). ``shutdown()`` never cancels it.
        grace_period: Seconds an item gets, once its token is cancelled, before its worker is
            killed; and what workers get if this process dies (a finite number >= 0).

    Raises:
        TypeError, ValueError: a bad argument (an initializer that cannot be pickled, say);
            nothing is started then.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        start_method: str | None = None,
        max_tasks_per_child: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        timeout: float | None = None,
        memory_limit: int | None = None,
        critical: bool = False,
        token: CancellationToken | None = None,
        grace_period: float = 5.0,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        _positive_int(max_workers, "max_workers")
        if max_tasks_per_child is not None:
            _positive_int(max_tasks_per_child, "max_tasks_per_child")
        methods = multiprocessing.get_all_start_methods()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in methods else "spawn"
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if not isinstance(initargs, tuple | list):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        if not isinstance(critical, bool):
            raise TypeError(f"critical must be a bool, not {type(critical).__name__}")
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(
                f"token must be a CancellationToken or None, not {type(token).__name__}"
            )
        grace = check_timeout(grace_period, "grace_period", finite=True)
        # Quiet: a worker's crash is its item's outcome, reported (and logged) by the pool.
        options = dataclasses.replace(check_options(memory_limit=memory_limit), quiet=True)
        limit = check_timeout(timeout)
        worker = WorkerConfig(
            initializer=None
            if initializer is None
            else items.dumps_object(initializer, "its initializer"),
            memory_limit=memory_limit,
            depth=_DEPTH,
        )
        config = PoolConfig(
            max_workers=max_workers,
            max_tasks_per_child=max_tasks_per_child,
            timeout=limit,
            grace=grace,
            critical=critical,
            worker=worker,
            initargs=tuple(initargs),
            options=options,
        )
        self._start_method = start_method
        self._token = token if token is not None else CancellationToken()
        backend = LocalBackend(LocalConfig(start_method, OWN_PRELOAD, grace))
        self._pool = Pool(backend, config, self._token)
        # Collected without shutdown(): the pool ends once its items are done (as CF's does).
        self._finalizer = weakref.finalize(self, self._pool.shutdown, False)
        self._finalizer.atexit = False  # interpreter exit waits instead (procsup._executor.pool)

    @property
    def token(self) -> CancellationToken:
        """The executor's token: every item runs under its own descendant of it."""
        return self._token

    @property
    def max_workers(self) -> int:
        """Worker processes at most."""
        return self._pool.config.max_workers

    @property
    def start_method(self) -> str:
        """How worker processes start: "forkserver", "spawn" or "fork"."""
        return self._start_method

    @property
    def grace_period(self) -> float:
        """Seconds an item gets, once its token is cancelled, before its worker is killed."""
        return self._pool.config.grace

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> ItemFuture[T]:
        """Schedule ``fn(*args, **kwargs)`` in a worker; return its future.

        The call is pickled here, by reference where it can be and by value (cloudpickle)
        otherwise, so lambdas, closures and functions of ``__main__`` work.

        Raises:
            TypeError: ``fn`` is not callable, or the call cannot be pickled (the message names
                the argument); or the first worker could not be started (``initargs`` that
                cannot be pickled for the start method).
            RuntimeError: after ``shutdown()``, once ``token`` is cancelled (naming why), or in a
                process forked from the executor's owner (its threads did not come along).
            BrokenExecutorError: the executor is broken (a failed initializer, say).
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return self._pool.submit(fn, args, kwargs, items.describe(fn))

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Return an iterator of ``fn(*args)`` for each tuple of ``zip(*iterables)``, in order.

        Every call is submitted at once. ``timeout``: seconds from this call until every result
        is in; the iterator raises ``TimeoutError`` when one is not in time, and cancels every
        item still pending or running. ``chunksize``: calls per item (fewer round trips for
        many small calls; a crash then fails the whole chunk).

        Raises:
            ValueError: ``chunksize`` < 1, or a negative ``timeout``.
            TypeError, RuntimeError: as ``submit()`` (the items already submitted are cancelled).
        """
        limit = check_timeout(timeout)
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if limit is None else time.monotonic() + limit
        futures: list[ItemFuture[Any]] = []
        try:
            if chunksize == 1:
                for args in zip(*iterables, strict=False):
                    futures.append(self.submit(fn, *args))
            else:
                name = f"{items.describe(fn)} (chunk)"
                for chunk in _chunks(zip(*iterables, strict=False), chunksize):
                    futures.append(self._pool.submit(run_chunk, (fn, chunk), {}, name))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        results = _results(futures, end)
        if chunksize == 1:
            return results
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more items and end the workers once the queued items have run.

        Args:
            wait: Return only once every item has ended and every worker has been reaped.
            cancel_futures: Cancel the items not started yet (running ones go on).

        Idempotent; never cancels ``token``.
        """
        self._pool.shutdown(wait, cancel_futures)

    def __repr__(self) -> str:
        workers, waiting = self._pool.counts()
        return (
            f"<procsup.Executor {self._start_method}, {workers} of {self.max_workers} workers, "
            f"{waiting} waiting>"
        )


Executor.__module__ = "procsup"


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")


def _chunks(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(calls, size)):
        yield chunk


def _results(futures: list[ItemFuture[Any]], end: float | None) -> Iterator[Any]:
    """Each future's result in order; whatever stops the iteration cancels the rest."""
    try:
        futures.reverse()  # pop() from the end: each result is dropped once yielded
        while futures:
            future = futures.pop()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            finally:
                future.cancel()  # on a timeout (CF does the same); a no-op once done
            del future
            yield value
    finally:
        for future in futures:
            future.cancel()
