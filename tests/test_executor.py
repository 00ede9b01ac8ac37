"""procsup.Executor: concurrent.futures' executor tests ported, then what procsup adds (a crash
isolated to its item, cancelling running items, timeouts, critical executors), under every start
method.

Synchronisation is by handshake: items cancel tokens given to every worker in ``initargs``
(``executor_items.remember``) to say they got somewhere, and wait on others to be let go. No test
depends on how long anything takes; every wait has a deadline.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import functools
import gc
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import procsup
from procsup import (
    BrokenExecutorError,
    CancellationToken,
    CriticalTaskError,
    Executor,
    RemoteTraceback,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._executor import handout
from tests import executor_items as items
from tests.conftest import process_gone
from tests.executor_items import DEADLINE

MakeExecutor = Callable[..., Executor]


@pytest.fixture
def make(start_method: str) -> Iterator[MakeExecutor]:
    """Make executors for this start method; each is shut down (and waited for) afterwards."""
    made: list[Executor] = []

    def make_executor(max_workers: int = 2, **kwargs: Any) -> Executor:
        kwargs.setdefault("grace_period", DEADLINE)  # no kill unless a test asks for one
        executor = Executor(max_workers, start_method=start_method, **kwargs)
        made.append(executor)
        return executor

    yield make_executor
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


def tokens(count: int) -> tuple[CancellationToken, ...]:
    return tuple(CancellationToken() for _ in range(count))


def collect(iterator: Any, into: list[Any]) -> None:
    """Append what ``iterator`` yields to ``into`` (so that what came before a raise is kept)."""
    for value in iterator:
        into.append(value)


def arrived(token: CancellationToken) -> int:
    """Wait for an item to say it got there (``items.arrive``); return its worker's pid."""
    assert token.wait(DEADLINE), "the item never got there"
    return int(token.cause or "0")


# ---------------------------------------------------------------- concurrent.futures' tests


def test_submit(make: MakeExecutor) -> None:
    """Test that submit runs fn(*args) and the future gives its value (CF test_submit)."""
    executor = make()
    assert executor.submit(pow, 2, 8).result(DEADLINE) == 256


def test_submit_keyword(make: MakeExecutor) -> None:
    """Test that keyword arguments reach the call (CF test_submit_keyword)."""
    executor = make()
    assert executor.submit(items.mul, 2, y=8).result(DEADLINE) == 16


def test_map(make: MakeExecutor) -> None:
    """Test that map yields fn over zipped iterables in order, chunked or not (CF test_map,
    test_map_chunksize)."""
    executor = make()
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), timeout=DEADLINE)) == expected
    for chunksize in (2, 3, 20):
        got = executor.map(pow, range(10), range(10), chunksize=chunksize, timeout=DEADLINE)
        assert list(got) == expected


def test_map_chunksize_must_be_positive() -> None:
    """Test that chunksize < 1 raises ValueError, and nothing is submitted (CF)."""
    with Executor(1) as executor:
        for chunksize in (0, -1):
            with pytest.raises(ValueError, match="chunksize must be >= 1"):
                executor.map(pow, range(3), range(3), chunksize=chunksize)


def test_map_exception(make: MakeExecutor) -> None:
    """Test that map raises an item's exception when its result is reached (CF
    test_map_exception)."""
    executor = make()
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=DEADLINE)
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(make: MakeExecutor) -> None:
    """Test that map's timeout raises TimeoutError at the first late result, after yielding the
    ones before, and cancels what is left, running items included (CF test_map_timeout, with an
    item that cannot finish in time: it waits until its token is cancelled)."""
    signals = tokens(4)
    executor = make(2, initializer=items.remember, initargs=signals)
    for _ in range(2):  # both workers up: the quick items are not kept waiting for a start
        executor.submit(items.pid).result(DEADLINE)
    results: list[Any] = []
    with pytest.raises(TimeoutError):
        collect(executor.map(items.step, range(3), [2] * 3, timeout=1.0), results)
    # Yielded in order, as they came (on a machine this busy, the first may be late too).
    assert results == [arrived(signals[i]) for i in range(len(results))]
    # The running item was cancelled when map gave up: it saw its token cancelled.
    assert signals[3].wait(DEADLINE)


def test_run_after_shutdown(make: MakeExecutor) -> None:
    """Test that submit after shutdown raises RuntimeError (CF test_run_after_shutdown)."""
    executor = make()
    executor.submit(pow, 2, 2).result(DEADLINE)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)


def test_shutdown_before_any_submit() -> None:
    """Test that an executor never used shuts down at once, with nothing started."""
    executor = Executor(2)
    executor.shutdown()
    executor.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 2)


def test_shutdown_cancel_futures(make: MakeExecutor) -> None:
    """Test that shutdown(cancel_futures=True) cancels every item not started, and the running
    ones finish (CF test_cancel_futures, where which items run is decided by handshakes)."""
    signals = tokens(3)
    executor = make(2, initializer=items.remember, initargs=signals)
    running = [executor.submit(items.arrive_then_wait, i, 2, i) for i in range(2)]
    for i in range(2):
        arrived(signals[i])
    waiting = [executor.submit(items.mul, i, i) for i in range(20)]
    executor.shutdown(wait=False, cancel_futures=True)
    assert all(future.cancelled() for future in waiting)
    signals[2].cancel()  # let the running ones go
    executor.shutdown(wait=True)
    assert [future.result(0) for future in running] == [0, 1]


def test_shutdown_cancel_futures_cancels_the_item_being_handed_out(
    make: MakeExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that shutdown(cancel_futures=True) cancels an item the executor's thread has taken
    off the queue and not yet put in a worker's pipe, where shutdown looks for items: the thread
    is held there, by a handshake, until shutdown() has returned."""
    signals = tokens(3)
    executor = make(1, initializer=items.remember, initargs=signals)
    running = executor.submit(items.arrive_then_wait, 0, 1, "ran")
    arrived(signals[0])
    in_hand, shut = threading.Event(), threading.Event()
    send = handout.Handout._send

    def held_send(self: handout.Handout, worker: Any, item: Any) -> None:
        if item.description.startswith("mul") and not in_hand.is_set():
            in_hand.set()
            shut.wait(DEADLINE)
        send(self, worker, item)

    monkeypatch.setattr(handout.Handout, "_send", held_send)
    waiting = executor.submit(items.mul, 6, 7)
    assert in_hand.wait(DEADLINE)
    try:
        executor.shutdown(wait=False, cancel_futures=True)
        assert waiting.cancelled()
    finally:
        shut.set()
    signals[1].cancel()  # let the running one go
    executor.shutdown(wait=True)
    assert running.result(0) == "ran"
    assert waiting.cancelled()


def test_context_manager_ends_every_worker(start_method: str) -> None:
    """Test that leaving the with block waits for the items and ends the workers (CF
    test_context_manager_shutdown, test_processes_terminate)."""
    with Executor(2, start_method=start_method) as executor:
        pids = {executor.submit(items.pid).result(DEADLINE) for _ in range(4)}
        assert executor.submit(abs, -5).result(DEADLINE) == 5
    for pid in pids:
        assert process_gone(pid, DEADLINE)


def test_no_stale_references(make: MakeExecutor) -> None:
    """Test that the executor keeps no reference to a call's arguments once it is sent (CF
    test_no_stale_references): they are pickled when submitted."""
    executor = make()

    class Owned:
        pass

    owned = Owned()
    gone = threading.Event()
    ref = weakref.ref(owned, lambda _: gone.set())
    future = executor.submit(items.identity, owned)
    del owned
    gc.collect()
    assert gone.wait(DEADLINE)
    assert ref() is None
    assert type(future.result(DEADLINE)).__name__ == "Owned"


@pytest.mark.parametrize("value", [0, -1])
def test_max_workers_must_be_positive(value: int) -> None:
    """Test that max_workers <= 0 raises ValueError (CF test_max_workers_negative)."""
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        Executor(value)


def test_wait_first_completed(make: MakeExecutor) -> None:
    """Test wait(FIRST_COMPLETED): a finished item is returned, a blocked one is not (CF
    test_first_completed)."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    quick = executor.submit(items.mul, 21, 2)
    done, not_done = concurrent.futures.wait([blocked, quick], DEADLINE, FIRST_COMPLETED)
    assert done == {quick}
    assert not_done == {blocked}
    signals[1].cancel()


def test_wait_first_exception(make: MakeExecutor) -> None:
    """Test wait(FIRST_EXCEPTION) returns once an item raises (CF test_first_exception)."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    failing = executor.submit(items.divide, 1, 0)
    done, not_done = concurrent.futures.wait([blocked, failing], DEADLINE, FIRST_EXCEPTION)
    assert done == {failing}
    assert not_done == {blocked}
    signals[1].cancel()


def test_wait_all_completed_and_timeout(make: MakeExecutor) -> None:
    """Test wait(ALL_COMPLETED), and wait's timeout with an item that cannot finish in time (CF
    test_all_completed, test_timeout)."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    futures = [executor.submit(items.mul, i, 2) for i in range(6)]
    done, not_done = concurrent.futures.wait(futures, DEADLINE, ALL_COMPLETED)
    assert done == set(futures)
    assert not not_done
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    done, not_done = concurrent.futures.wait([blocked, futures[0]], 0.1)
    assert done == {futures[0]}
    assert not_done == {blocked}
    signals[1].cancel()


def test_as_completed(make: MakeExecutor) -> None:
    """Test as_completed: each future once, duplicates folded, the timeout raised while one is
    blocked (CF test_as_completed: test_no_timeout, test_duplicate_futures, test_zero_timeout)."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    futures = [executor.submit(items.mul, i, 3) for i in range(8)]
    finished = list(concurrent.futures.as_completed(futures + futures, DEADLINE))
    assert len(finished) == 8
    assert {f.result() for f in finished} == {3 * i for i in range(8)}
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    seen: list[Any] = []
    with pytest.raises(TimeoutError):
        collect(concurrent.futures.as_completed([blocked, futures[0]], timeout=0), seen)
    assert seen == [futures[0]]
    signals[1].cancel()


def test_initializer(make: MakeExecutor) -> None:
    """Test that the initializer runs in each worker before its items (CF test_initializer)."""
    executor = make(2, initializer=items.set_state, initargs=("initialized", "yes"))
    values = [executor.submit(items.get_state, "initialized") for _ in range(6)]
    assert [future.result(DEADLINE) for future in values] == ["yes"] * 6


def test_failing_initializer_breaks_the_executor(make: MakeExecutor) -> None:
    """Test that an initializer that raises fails the waiting items with a BrokenExecutor that
    carries its traceback, and every later submit too (CF FailingInitializerMixin)."""
    executor = make(2, initializer=items.failing_init, initargs=("no database",))
    futures = []
    for i in range(5):  # once a worker has failed, the next submit raises (the first cannot)
        try:
            futures.append(executor.submit(items.mul, i, i))
        except BrokenExecutorError:
            break
    assert futures
    for future in futures:
        with pytest.raises(concurrent.futures.BrokenExecutor) as info:
            future.result(DEADLINE)
        error = info.value
        assert isinstance(error, BrokenExecutorError)
        assert isinstance(error, CriticalTaskError)
        message = str(error)
        assert "raised ValueError: no database" in message
        assert "Traceback (most recent call last)" in message
        assert "in failing_init" in message
    with pytest.raises(BrokenExecutorError, match="no database"):
        executor.submit(items.mul, 1, 1)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is BrokenExecutorError
    assert str(clone) == message


def test_crashing_initializer_breaks_the_executor(make: MakeExecutor) -> None:
    """Test that a worker dying in its initializer breaks the executor instead of being replaced
    for ever."""
    executor = make(1, initializer=items.crashing_init)
    with pytest.raises(BrokenExecutorError, match=r"died before it was ready: .*SIGSEGV"):
        executor.submit(items.mul, 1, 1).result(DEADLINE)


def test_max_tasks_per_child(make: MakeExecutor) -> None:
    """Test that a worker is replaced after max_tasks_per_child items (CF
    test_max_tasks_per_child)."""
    executor = make(1, max_tasks_per_child=3)
    original = executor.submit(items.pid).result(DEADLINE)
    assert executor.submit(items.pid).result(DEADLINE) == original
    assert executor.submit(items.pid).result(DEADLINE) == original
    replaced = executor.submit(items.pid).result(DEADLINE)
    assert replaced != original
    assert process_gone(original, DEADLINE)


def test_max_tasks_per_child_early_shutdown(make: MakeExecutor) -> None:
    """Test that shutdown right after submits with max_tasks_per_child=1 still runs them all (CF
    test_max_tasks_early_shutdown)."""
    executor = make(3, max_tasks_per_child=1)
    futures = [executor.submit(items.mul, i, i) for i in range(6)]
    executor.shutdown()
    assert [future.result(0) for future in futures] == [i * i for i in range(6)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_workers": "2"}, TypeError, "max_workers must be an int"),
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child must be greater than 0"),
        ({"start_method": "teleport"}, ValueError, "start_method must be one of"),
        ({"initializer": 3}, TypeError, "initializer must be callable"),
        ({"initargs": "ab"}, TypeError, "initargs must be a tuple"),
        ({"timeout": -1}, ValueError, "timeout must be >= 0"),
        ({"memory_limit": 0}, ValueError, "memory_limit must be > 0"),
        ({"critical": 1}, TypeError, "critical must be a bool"),
        ({"token": "root"}, TypeError, "token must be a CancellationToken"),
        ({"grace_period": -1}, ValueError, "grace_period must be a finite number"),
        ({"initializer": threading.Lock().acquire}, TypeError, "cannot send its initializer"),
    ],
)
def test_bad_arguments_raise_before_anything_starts(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Test that each bad argument is refused by the constructor, naming it."""
    with pytest.raises(error, match=match):
        Executor(**kwargs)


# ---------------------------------------------------------------- types, asyncio, tokens


def test_types_are_concurrent_futures(make: MakeExecutor) -> None:
    """Test that the executor and its futures are concurrent.futures types, and done callbacks
    run."""
    executor = make()
    assert isinstance(executor, concurrent.futures.Executor)
    future = executor.submit(items.mul, 6, 7)
    assert isinstance(future, concurrent.futures.Future)
    called = threading.Event()
    future.add_done_callback(lambda f: called.set())
    assert future.result(DEADLINE) == 42
    assert called.wait(DEADLINE)
    assert procsup.Executor is Executor
    assert Executor.__module__ == "procsup"


def test_run_in_executor_and_cancel_from_asyncio(make: MakeExecutor) -> None:
    """Test that loop.run_in_executor works, and cancelling the asyncio future cancels the
    running item's token."""
    signals = tokens(2)
    executor = make(1, initializer=items.remember, initargs=signals)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        product = loop.run_in_executor(executor, items.mul, 6, 7)
        assert await asyncio.wait_for(product, DEADLINE) == 42
        running = loop.run_in_executor(executor, items.arrive_then_wait_for_cancel, 0, 1)
        await asyncio.wait_for(signals[0].cancelled(), DEADLINE)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await asyncio.wait_for(signals[1].cancelled(), DEADLINE)

    asyncio.run(main())
    assert "was cancelled" in (signals[1].cause or "")


def test_each_item_has_its_own_token_below_the_executors(make: MakeExecutor) -> None:
    """Test that current_token() in an item is its own, live, and that cancelling the
    executor's token reaches it (it is a descendant)."""
    executor = make(1)
    first = executor.submit(items.token_id).result(DEADLINE)
    second = executor.submit(items.token_id).result(DEADLINE)
    assert first != second
    assert executor.submit(items.token_state).result(DEADLINE) == (False, None)


def test_async_item_runs_in_a_fresh_loop(make: MakeExecutor) -> None:
    """Test that an async def item is awaited in the worker, as a task's would be."""
    executor = make(1)
    # The executor awaits what an async def returns: the future holds the value, not a coroutine.
    assert executor.submit(items.async_double, 21).result(DEADLINE) == 42  # type: ignore[comparison-overlap]


# ---------------------------------------------------------------- outcomes


def test_exception_is_the_items_own_with_the_worker_traceback(make: MakeExecutor) -> None:
    """Test that result() raises the item's exception, same type and args, with the worker's
    frames and its chain, as CF does."""
    executor = make(1)
    with pytest.raises(items.Custom) as custom:
        executor.submit(items.raise_custom, 7).result(DEADLINE)
    assert custom.value.args == (7, "custom failure")
    assert custom.value.code == 7
    with pytest.raises(ValueError, match="lookup failed") as chained:
        executor.submit(items.raise_chained).result(DEADLINE)
    frames = []
    tb = chained.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "raise_chained" in frames
    assert isinstance(chained.value.__cause__, KeyError)


@dataclass(frozen=True)
class Case:
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    error: type[BaseException] | None = None  # None: returns None
    message: str = ""  # a regex, searched in str(error)
    crashed: bool = False  # the worker died: it is replaced
    signal: str | None = None
    exitcode: int | None = None


CRASHES = {
    "SIGKILL": Case(
        items.sigkill,
        error=TaskCrashedError,
        message=r"^Executor item 'sigkill #\d+' crashed: killed by SIGKILL \(signal 9\)",
        crashed=True,
        signal="SIGKILL",
        exitcode=-9,
    ),
    "SIGSEGV": Case(
        items.segfault,
        error=TaskCrashedError,
        message=r"killed by SIGSEGV \(signal 11\) in segfault\(\) at .*executor_items\.py:\d+",
        crashed=True,
        signal="SIGSEGV",
        exitcode=-11,
    ),
    "SIGABRT": Case(
        items.abort,
        error=TaskCrashedError,
        message=r"killed by SIGABRT \(signal 6\)",
        crashed=True,
        signal="SIGABRT",
        exitcode=-6,
    ),
    "os._exit(3)": Case(
        items.hard_exit,
        (3,),
        error=TaskCrashedError,
        message="exited with code 3 without reporting a result",
        crashed=True,
        exitcode=3,
    ),
    "os._exit(0)": Case(
        items.hard_exit,
        (0,),
        error=TaskCrashedError,
        message="exited with code 0 before reporting a result",
        crashed=True,
        exitcode=0,
    ),
    "SystemExit(3)": Case(
        items.system_exit, (3,), error=TaskPanickedError, message="panicked: SystemExit: 3"
    ),
    "SystemExit(0)": Case(items.system_exit, (0,)),
    "KeyboardInterrupt": Case(
        items.keyboard_interrupt, error=TaskPanickedError, message="panicked: KeyboardInterrupt"
    ),
    "exception": Case(items.raise_chained, error=ValueError, message="lookup failed"),
    "unpicklable exception": Case(
        items.unpicklable_error,
        error=TaskFailedError,
        message="failed: UnpicklableError: cannot cross",
    ),
    "unpicklable result": Case(
        items.unpicklable_return,
        error=pickle.PicklingError,
        message=r"return value \(Unpicklable\) cannot be sent to the parent",
    ),
}


@pytest.mark.parametrize("case", CRASHES.values(), ids=CRASHES.keys())
def test_crash_matrix(make: MakeExecutor, case: Case) -> None:
    """Test each way an item can end: what its future raises, that only it fails (the items
    behind it in its worker run elsewhere), and that a dead worker is replaced and the executor
    stays usable."""
    executor = make(1)
    before = executor.submit(items.pid).result(DEADLINE)
    future = executor.submit(case.fn, *case.args)
    after = [executor.submit(items.mul, i, i) for i in range(6)]  # some wait in its pipe
    if case.error is None:
        assert future.result(DEADLINE) is None
    else:
        with pytest.raises(case.error) as info:
            future.result(DEADLINE)
        assert re.search(case.message, str(info.value)), str(info.value)
        error = info.value
        if isinstance(error, TaskCrashedError):
            assert error.pid == before
            assert error.signal == case.signal
            assert error.exitcode == case.exitcode
            assert not error.stopped
            assert (error.description or "").startswith(case.fn.__name__ + " #")
            notes = "\n".join(getattr(error, "__notes__", []))
            assert f"crash record: pid {before}" in notes
        if isinstance(error, CriticalTaskError):
            clone = pickle.loads(pickle.dumps(error))
            assert type(clone) is type(error)
            assert str(clone) == str(error)
    assert [f.result(DEADLINE) for f in after] == [i * i for i in range(6)]
    now = executor.submit(items.pid).result(DEADLINE)
    assert (now != before) == case.crashed
    if case.crashed:
        assert process_gone(before, DEADLINE)


def test_segfault_record_names_the_site(make: MakeExecutor) -> None:
    """Test that a native crash's record carries the faulthandler dump of the item's frame."""
    executor = make(1)
    with pytest.raises(TaskCrashedError) as info:
        executor.submit(items.segfault).result(DEADLINE)
    dump = info.value.faulthandler_dump or ""
    assert "in segfault" in dump
    assert info.value.peak_rss is not None


def test_unpicklable_exception_keeps_the_worker_traceback(make: MakeExecutor) -> None:
    """Test that an exception that cannot be pickled arrives as text, its type named."""
    executor = make(1)
    with pytest.raises(TaskFailedError) as info:
        executor.submit(items.unpicklable_error).result(DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.type_name == "tests.executor_items.UnpicklableError"
    assert "in unpicklable_error" in cause.text


def test_a_crash_fails_only_its_item(make: MakeExecutor) -> None:
    """Test that among many items on several workers, a crash fails its own item only."""
    executor = make(2)
    futures = [
        executor.submit(items.sigkill) if i in (5, 17) else executor.submit(items.mul, i, 2)
        for i in range(30)
    ]
    for i, future in enumerate(futures):
        if i in (5, 17):
            with pytest.raises(TaskCrashedError, match="SIGKILL"):
                future.result(DEADLINE)
        else:
            assert future.result(DEADLINE) == 2 * i


@pytest.mark.parametrize(("how", "exitcode"), [("return", 0), ("raise", 1), ("0", 0), ("3", 3)])
def test_a_process_an_item_forked_that_comes_back_exits(
    make: MakeExecutor, how: str, exitcode: int
) -> None:
    """Test that a process an item forked and did not end with os._exit (it returned, raised or
    called sys.exit()) exits as a script would, instead of answering for the item or taking the
    worker's next items."""
    executor = make(1)
    pid = executor.submit(items.pid).result(DEADLINE)
    assert executor.submit(items.fork_then, how).result(DEADLINE) == ("parent", exitcode)
    assert [executor.submit(items.pid).result(DEADLINE) for _ in range(8)] == [pid] * 8


def test_idle_worker_killed_from_outside_fails_no_item(make: MakeExecutor) -> None:
    """Test that a worker killed while idle is replaced, and an item sent to it before its
    death was known goes to another worker instead of failing."""
    executor = make(1)
    pid = executor.submit(items.pid).result(DEADLINE)
    os.kill(pid, 9)
    assert [executor.submit(items.mul, i, 3).result(DEADLINE) for i in range(5)] == [
        3 * i for i in range(5)
    ]
    assert executor.submit(items.pid).result(DEADLINE) != pid


def test_items_behind_a_blocked_one_run_on_an_idle_worker(make: MakeExecutor) -> None:
    """Test that an item waiting in the pipe of a worker that is busy is taken back by a worker
    that goes idle, as a shared queue would give it: none waits behind the blocked item."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    blocked = executor.submit(items.arrive_then_wait, 0, 1, "done")
    arrived(signals[0])
    quick = [executor.submit(items.mul, i, 5) for i in range(24)]
    _, not_done = concurrent.futures.wait(quick, DEADLINE)
    assert not not_done
    assert [f.result() for f in quick] == [5 * i for i in range(24)]
    assert not blocked.done()
    signals[1].cancel()
    assert blocked.result(DEADLINE) == "done"


def test_memory_limit_applies_per_worker(make: MakeExecutor) -> None:
    """Test that memory_limit fails an item that goes over it with MemoryError, and the worker
    goes on."""
    executor = make(1, memory_limit=256 << 20)
    pid = executor.submit(items.pid).result(DEADLINE)
    with pytest.raises(MemoryError, match="memory limit exceeded"):
        executor.submit(items.allocate, 512 << 20).result(DEADLINE)
    assert executor.submit(items.allocate, 1 << 20).result(DEADLINE) == 1 << 20
    assert executor.submit(items.pid).result(DEADLINE) == pid


# ---------------------------------------------------------------- timeouts and cancel()


def test_timeout_honoured_keeps_the_worker(make: MakeExecutor) -> None:
    """Test that at the deadline the item's token is cancelled, the item returns, the future
    raises TimeoutError, and its worker goes on."""
    signals = tokens(2)
    executor = make(1, timeout=0.2, initializer=items.remember, initargs=signals)
    future = executor.submit(items.arrive_then_wait_for_cancel, 0, 1)
    pid = arrived(signals[0])
    with pytest.raises(TimeoutError, match=r"item 'arrive_then_wait_for_cancel #\d+' timed out"):
        future.result(DEADLINE)
    assert signals[1].wait(DEADLINE)
    assert "timed out after 0.2 s" in (signals[1].cause or "")
    assert psutil_alive(pid)


def test_timeout_ignored_kills_the_worker(make: MakeExecutor) -> None:
    """Test that an item that ignores its cancelled token is killed after the grace period:
    TimeoutError caused by the crash, and the worker replaced."""
    signals = tokens(2)
    executor = make(1, timeout=0.2, grace_period=0.2, initializer=items.remember, initargs=signals)
    future = executor.submit(items.arrive_then_ignore_cancel, 0)
    pid = arrived(signals[0])
    with pytest.raises(TimeoutError) as info:
        future.result(DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, TaskCrashedError)
    assert "exceeded its timeout of 0.2 s and did not honour cancellation" in str(cause)
    assert process_gone(pid, DEADLINE)
    executor.submit(items.arrive, 1)
    assert arrived(signals[1]) != pid


def test_timeout_zero_never_runs_the_item(make: MakeExecutor) -> None:
    """Test that timeout=0 means no time at all: TimeoutError, the item not run."""
    executor = make(1, timeout=0)
    with pytest.raises(TimeoutError, match="timed out after 0 s"):
        executor.submit(items.mul, 2, 3).result(DEADLINE)


def test_cancel_pending_item(make: MakeExecutor) -> None:
    """Test that cancel() on a waiting item cancels it, at once for wait(), and it never runs."""
    signals = tokens(3)
    executor = make(1, initializer=items.remember, initargs=signals)
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    waiting = [executor.submit(items.arrive, 2) for _ in range(8)]  # in its pipe, and queued
    for future in waiting:
        assert future.cancel()
        assert future.cancelled()
    done, _ = concurrent.futures.wait(waiting, 0)
    assert done == set(waiting)
    signals[1].cancel()
    blocked.result(DEADLINE)
    assert executor.submit(items.mul, 2, 2).result(DEADLINE) == 4
    assert not signals[2].is_cancelled()  # none of them ran


def test_cancel_running_item_that_honours_it(make: MakeExecutor) -> None:
    """Test that cancel() on a running item returns True, cancels its token (the item sees it),
    and its worker goes on when the item returns."""
    signals = tokens(3)
    executor = make(1, initializer=items.remember, initargs=signals)
    future = executor.submit(items.arrive_then_wait_for_cancel, 0, 1)
    pid = arrived(signals[0])
    assert future.running()
    assert future.cancel()
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(0)
    assert signals[1].wait(DEADLINE)
    assert "was cancelled" in (signals[1].cause or "")
    executor.submit(items.arrive, 2)
    assert arrived(signals[2]) == pid


def test_cancel_running_item_that_ignores_it(make: MakeExecutor) -> None:
    """Test that a running item that ignores its cancelled token is killed after the grace
    period, its future cancelled, and a replacement worker runs what follows."""
    signals = tokens(2)
    executor = make(1, grace_period=0.2, initializer=items.remember, initargs=signals)
    future = executor.submit(items.arrive_then_ignore_cancel, 0)
    pid = arrived(signals[0])
    behind = [executor.submit(items.mul, i, 7) for i in range(3)]  # waiting in its pipe
    assert future.cancel()
    assert process_gone(pid, DEADLINE)
    assert [f.result(DEADLINE) for f in behind] == [0, 7, 14]
    executor.submit(items.arrive, 1)
    assert arrived(signals[1]) != pid
    assert future.cancelled()


def test_cancel_finished_item_returns_false(make: MakeExecutor) -> None:
    """Test that a finished item cannot be cancelled."""
    executor = make(1)
    future = executor.submit(items.mul, 3, 3)
    assert future.result(DEADLINE) == 9
    assert not future.cancel()


# ---------------------------------------------------------------- critical executors, the token


FAILURES = {
    "exception": (items.divide, (1, 0), ZeroDivisionError, "failed: ZeroDivisionError"),
    "crash": (items.sigkill, (), TaskCrashedError, "crashed: killed by SIGKILL"),
    "panic": (items.system_exit, (4,), TaskPanickedError, "panicked: SystemExit: 4"),
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_critical_failure_cancels_everything(
    make: MakeExecutor, failure: tuple[Callable[..., Any], tuple[Any, ...], type, str]
) -> None:
    """Test critical=True: the first failure cancels the executor's token (naming the item)
    before its future is published; running items see their tokens cancelled; waiting items
    are cancelled; submit raises naming the cause."""
    fn, args, error, text = failure
    signals = tokens(2)
    executor = make(2, critical=True, initializer=items.remember, initargs=signals)
    running = executor.submit(items.arrive_then_wait_for_cancel, 0, 1)
    arrived(signals[0])
    failing = executor.submit(fn, *args)
    with pytest.raises(error):
        failing.result(DEADLINE)
    assert executor.token.is_cancelled()  # before result() could raise
    cause = executor.token.cause or ""
    assert re.search(rf"Executor item '{fn.__name__} #\d+' {text}", cause), cause
    assert signals[1].wait(DEADLINE)
    assert signals[1].cause == cause
    assert running.result(DEADLINE) == "saw the cancellation"
    with pytest.raises(RuntimeError, match="the executor's token was cancelled"):
        executor.submit(items.mul, 1, 1)


def test_critical_timeout_cancels_everything(make: MakeExecutor) -> None:
    """Test that a timed-out item of a critical executor cancels its token, naming it."""
    executor = make(1, critical=True, timeout=0.2)
    with pytest.raises(TimeoutError):
        executor.submit(items.wait_for_cancel).result(DEADLINE)
    assert re.search(
        r"Executor item 'wait_for_cancel #\d+' timed out after 0.2 s", executor.token.cause or ""
    )


@pytest.mark.parametrize("critical", [False, True])
def test_cancelling_the_token_from_outside(make: MakeExecutor, critical: bool) -> None:
    """Test that cancelling the executor's token does what a critical failure does: running items
    see it, waiting ones are cancelled, submit raises; with critical or not."""
    signals = tokens(4)
    executor = make(2, critical=critical, initializer=items.remember, initargs=signals)
    running = [executor.submit(items.arrive_then_wait_for_cancel, i, i + 2) for i in range(2)]
    for i in range(2):
        arrived(signals[i])
    waiting = [executor.submit(items.mul, i, i) for i in range(10)]
    executor.token.cancel("stop everything")
    for i in range(2):
        assert signals[i + 2].wait(DEADLINE)
        assert signals[i + 2].cause == "stop everything"
    assert [f.result(DEADLINE) for f in running] == ["saw the cancellation"] * 2
    concurrent.futures.wait(waiting, DEADLINE)
    assert all(f.cancelled() for f in waiting)
    with pytest.raises(RuntimeError, match=r"token was cancelled \(stop everything\)"):
        executor.submit(items.mul, 1, 1)


def test_cancelled_token_stops_items_that_ignore_it(make: MakeExecutor) -> None:
    """Test that once the token is cancelled, a running item that ignores it is stopped after
    the grace period (a TaskCrashedError saying it was stopped), so shutdown ends."""
    signals = tokens(1)
    executor = make(1, grace_period=0.2, initializer=items.remember, initargs=signals)
    future = executor.submit(items.arrive_then_ignore_cancel, 0)
    pid = arrived(signals[0])
    executor.token.cancel("enough")
    with pytest.raises(TaskCrashedError, match=r"was stopped on request: the executor's token"):
        future.result(DEADLINE)
    executor.shutdown()
    assert process_gone(pid, DEADLINE)


def test_a_given_token_is_the_executors_and_shutdown_leaves_it(start_method: str) -> None:
    """Test that token= is the executor's token, a critical failure cancels it, and a clean
    shutdown never does."""
    root = CancellationToken()
    with Executor(1, start_method=start_method, token=root) as executor:
        assert executor.token is root
        assert executor.submit(items.mul, 2, 2).result(DEADLINE) == 4
    assert not root.is_cancelled()
    with (
        Executor(1, start_method=start_method, token=root, critical=True) as executor,
        pytest.raises(ZeroDivisionError),
    ):
        executor.submit(items.divide, 1, 0).result(DEADLINE)
    assert "ZeroDivisionError" in (root.cause or "")


def test_cancel_unstarted_orders_a_take_back_against_a_start() -> None:
    """Test the arena operation that takes an item back: it cancels a node with no child (a
    child made later is born cancelled), refuses one that has a child (the item started), and
    refuses a node that is gone."""
    from procsup._token.token import borrow_node, cancel_unstarted, node

    parent = CancellationToken()
    waiting = parent.child_token()
    assert cancel_unstarted(borrow_node(parent, *node(waiting)), "taken back")
    assert waiting.cause == "taken back"
    assert waiting.child_token().is_cancelled()  # a start after the take-back: born cancelled
    started_node = parent.child_token()
    started = started_node.child_token()  # the start
    assert not cancel_unstarted(started_node, "too late")
    assert not started_node.is_cancelled()
    assert not started.is_cancelled()
    gone = parent.child_token()
    handle = borrow_node(parent, *node(gone))
    del gone
    gc.collect()
    assert not cancel_unstarted(handle, "gone")


# ---------------------------------------------------------------- pickling: what can be sent


def test_lambdas_closures_partials_and_local_classes(make: MakeExecutor) -> None:
    """Test that calls pickle plain pickle cannot (a lambda, a closure, a bound method of a
    local class) go by value, under every start method, and their results come back."""
    executor = make(1)
    offset = 5

    def add(x: int) -> int:
        return x + offset

    class Counter:
        def __init__(self, start: int) -> None:
            self.start = start

        def plus(self, x: int) -> Counter:
            return Counter(self.start + x)

    assert executor.submit(lambda x: x * 3, 4).result(DEADLINE) == 12
    assert executor.submit(add, 1).result(DEADLINE) == 6
    assert executor.submit(functools.partial(items.mul, 6), 7).result(DEADLINE) == 42
    result = executor.submit(Counter(10).plus, 5).result(DEADLINE)
    assert isinstance(result, Counter)
    assert result.start == 15
    assert list(executor.map(lambda x: x + 1, range(5), chunksize=2)) == [1, 2, 3, 4, 5]


def test_unpicklable_arguments_raise_from_submit(make: MakeExecutor) -> None:
    """Test that a call that cannot be pickled raises TypeError at once, naming the argument,
    and the executor goes on."""
    executor = make(1)
    with pytest.raises(TypeError, match=r"argument 1 \(lock\) cannot be pickled"):
        executor.submit(items.mul, 1, threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"keyword argument 'y' \(lock\) cannot be pickled"):
        executor.submit(items.mul, 1, y=threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a CancellationToken can cross into another process"):
        executor.submit(items.identity, CancellationToken())
    with pytest.raises(TypeError, match="fn must be callable"):
        executor.submit(3)  # type: ignore[arg-type]
    assert executor.submit(items.mul, 2, 3).result(DEADLINE) == 6


def test_unpicklable_argument_in_map_cancels_what_was_submitted(make: MakeExecutor) -> None:
    """Test that map raises at once on an argument that cannot be pickled, and the items it had
    already submitted never run."""
    signals = tokens(3)
    executor = make(1, initializer=items.remember, initargs=signals)
    blocked = executor.submit(items.arrive_then_wait, 0, 1)
    arrived(signals[0])
    with pytest.raises(TypeError, match="cannot be pickled"):
        executor.map(items.arrive, [2, 2, threading.Lock()])
    signals[1].cancel()
    blocked.result(DEADLINE)
    assert executor.submit(items.mul, 2, 3).result(DEADLINE) == 6  # after where they were
    assert not signals[2].is_cancelled()


# ---------------------------------------------------------------- nothing left behind


def test_shutdown_kills_what_items_left_running(make: MakeExecutor) -> None:
    """Test that processes an item started and left running (one in a session of its own) are
    gone once shutdown(wait=True) has returned, under every start method, not a grace period
    later."""
    executor = make(1)
    pids = executor.submit(items.leave_children).result(DEADLINE)
    assert all(psutil_alive(pid) for pid in pids)
    assert executor.submit(items.mul, 2, 2).result(DEADLINE) == 4  # the worker goes on
    assert all(psutil_alive(pid) for pid in pids)  # while it lives, so do they
    executor.shutdown(wait=True)
    assert [pid for pid in pids if not process_gone(pid, 0)] == []


def test_an_executor_copied_by_fork_refuses_items(make: MakeExecutor) -> None:
    """Test that in a process forked from the executor's owner, submit raises RuntimeError
    (its threads did not come along: the item would never run), even when another thread held
    the executor's lock at the fork, and shutdown and cancelling a copy of a running item's
    future do nothing; the owner's executor and item go on."""
    signals = tokens(2)
    executor = make(2, initializer=items.remember, initargs=signals)
    assert executor.submit(items.mul, 2, 3).result(DEADLINE) == 6
    running = executor.submit(items.arrive_then_report_token, 0, 1)
    arrived(signals[0])
    reader, writer = os.pipe()
    held, forked = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # as the executor's thread does every turn
        with executor._pool._lock:
            held.set()
            forked.wait(DEADLINE)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert held.wait(DEADLINE)
    try:
        pid = os.fork()
    finally:
        forked.set()
        holder.join(DEADLINE)
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(reader)
            running.cancel()
            try:
                executor.submit(items.mul, 1, 1)
            except RuntimeError as exc:
                os.write(writer, str(exc).encode())
            else:
                os.write(writer, b"submitted")
            executor.shutdown(wait=True)
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    try:
        assert process_gone(pid, DEADLINE)
        _, status = os.waitpid(pid, 0)
        report = os.read(reader, 4096).decode()
    finally:
        os.close(reader)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "a procsup.Executor cannot be used in a process forked from its owner"
    assert executor.submit(items.mul, 3, 3).result(DEADLINE) == 9
    signals[1].cancel()  # let the item go: it reports its token as the child left it
    assert running.result(DEADLINE) == (False, None)


def test_collected_executor_ends_its_workers(start_method: str) -> None:
    """Test that an executor dropped without shutdown still runs what was submitted, then ends
    its workers and threads (the leak check sees to the rest)."""
    executor = Executor(1, start_method=start_method)
    future = executor.submit(items.pid)
    del executor
    gc.collect()
    pid = future.result(DEADLINE)
    assert process_gone(pid, DEADLINE)


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import procsup

    ex = procsup.Executor(2, start_method=sys.argv[1])
    print(sorted({p for _, p in ex.map(lambda x: (x, os.getpid()), range(6))}), flush=True)
    square = lambda x: x * x
    ex.submit(lambda path: open(path, "w").write(str(square(12))), sys.argv[2])
    print("exiting", flush=True)
    """
)


def test_interpreter_exit_runs_what_was_submitted_then_ends_the_workers(
    start_method: str, tmp_path: Path
) -> None:
    """Test a newcomer's script at python -c: lambdas work, an executor never shut down runs
    what was submitted at interpreter exit, and no worker outlives the script."""
    done = tmp_path / "done"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, start_method, str(done)],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr
    pids_line, last = result.stdout.splitlines()
    assert last == "exiting"
    assert done.read_text() == "144"
    for pid in ast.literal_eval(pids_line):
        assert process_gone(pid, DEADLINE)


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
