"""One meaning for every public timeout: None and inf wait forever, 0 polls (a run gets no time
at all), a negative number or NaN raises ValueError, anything but an int or float TypeError."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import psutil
import pytest

import procsup._supervision.handle
import procsup._supervision.options
import procsup._supervision.status
import procsup._supervision.supervisor
import procsup._token.token
from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    Supervisor,
    TaskCrashedError,
    TaskFailedError,
)
from procsup._os.timeouts import NO_LIMIT, WAIT_CAP, capped, check_timeout
from procsup._process.guardian import Guardian
from tests import contract_tasks, tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]

FOREVER, POLL = "forever", "poll"
MATRIX: list[tuple[object, Any]] = [
    (None, FOREVER),
    (0, POLL),
    (math.inf, FOREVER),
    (-1, ValueError),
    (math.nan, ValueError),
    ("1", TypeError),
    (True, TypeError),
]
IDS = ["None", "0", "inf", "-1", "nan", "str", "True"]
matrix = pytest.mark.parametrize(("timeout", "means"), MATRIX, ids=IDS)


def _ready(reader: Connection) -> Any:
    assert reader.poll(DEADLINE), "the task never reached its handshake"
    return reader.recv()


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    """As conftest's, but not parametrized over start methods: timeouts mean the same under all
    (only ``spawn(timeout=0)`` is run under each, with conftest's ``runtime``)."""
    made: list[Connection] = []

    def make() -> tuple[Connection, Connection]:
        reader, writer = multiprocessing.Pipe(duplex=False)
        made.extend((reader, writer))
        return reader, writer

    yield make
    for conn in made:
        conn.close()


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    """A supervisor under the default start method, shut down after the test."""
    supervisor = Supervisor(grace_period=0.2)
    yield supervisor
    supervisor.shutdown()


@matrix
def test_check_timeout(timeout: Any, means: Any) -> None:
    """Test the one validator: None and inf mean no limit, 0 is 0.0, the rest raise."""
    if isinstance(means, type):
        with pytest.raises(means, match="my_timeout"):
            check_timeout(timeout, "my_timeout")
    else:
        assert check_timeout(timeout) == (None if means == FOREVER else 0.0)


def test_check_timeout_beyond_every_clock() -> None:
    """Test that a timeout beyond NO_LIMIT (~31 years, which no lock's wait takes) means no
    limit, a duration that long is refused, and a loop waits at most WAIT_CAP at a time."""
    assert check_timeout(3e6) == 3e6  # past epoll's 2**31 - 1 ms: still that many seconds
    assert check_timeout(1e10) is None
    assert check_timeout(NO_LIMIT, finite=True) == NO_LIMIT
    with pytest.raises(ValueError, match=r"grace_period must be .* <= 1e\+09"):
        check_timeout(1e10, "grace_period", finite=True)
    assert capped(None) == capped(3e6) == WAIT_CAP
    assert capped(0.5) == 0.5
    guardian = Guardian()
    guardian.doomed.append((1e18, 0, psutil.Process()))  # an orphan due in 3e10 years
    assert guardian.timeout() == WAIT_CAP


def test_timeouts_past_epolls_limit_keep_the_supervisor_alive(pipe: Pipe) -> None:
    """Test that timeouts, a backoff and a stop's grace of 3e6 s (35 days: more than epoll or
    select take, 2**31 - 1 ms) are waited in turns by the supervision thread, which lives on:
    the next task's outcome is published, and join() of 1e10 s is no limit."""
    with Supervisor(grace_period=3e6) as sup:
        parent = CancellationToken()
        failing = sup.spawn(
            tasks.fail, "backs off", parent_token=parent, restart="permanent", backoff=(3e6, 3e6)
        )
        reader, writer = pipe()
        waiting = sup.spawn(tasks.wait_for_cancel, "timed", args=(writer,), timeout=3e6)
        _ready(reader)
        assert waiting.stop(timeout=3e6) == "cancelled"  # its ladder's timers: 35 days off
        assert sup.spawn(tasks.return_value, "after", args=(7,)).join(1e10) == 7
        assert not parent.is_cancelled()  # the restart is due in 35 days
        assert sup.spawn(tasks.return_value, "again", args=(8,)).join(DEADLINE) == 8
        with pytest.raises(TaskFailedError):  # stopped in its backoff: the failure is final
            failing.stop(timeout=0)
    assert parent.is_cancelled()


def test_memory_limit_past_setrlimit_is_refused(sup: Supervisor) -> None:
    """Test that a memory_limit setrlimit() cannot take (>= 2**63, RLIM_INFINITY unsigned) is
    refused by spawn(), which starts nothing, instead of failing the task in its setup."""
    for limit in (2**63, 2**64 - 1):
        with pytest.raises(ValueError, match="memory_limit"):
            sup.spawn(tasks.return_value, "limited", args=(1,), memory_limit=limit)
    assert sup.tasks() == []


def test_every_public_timeout_uses_the_one_validator() -> None:
    """Test that the modules taking public timeouts share procsup._os.timeouts.check_timeout."""
    modules = [
        procsup._supervision.handle,
        procsup._supervision.options,
        procsup._supervision.status,
        procsup._supervision.supervisor,
    ]
    for module in [*modules, procsup._token.token]:
        assert module.check_timeout is check_timeout, module.__name__


@matrix
def test_join(sup: Supervisor, pipe: Pipe, timeout: Any, means: Any) -> None:
    """Test join(): forever waits for the outcome, 0 polls a running task, bad values raise."""
    reader, writer = pipe()
    h = sup.spawn(tasks.wait_for_cancel, "join", args=(writer,))
    _ready(reader)
    if means == FOREVER:
        h.cancel()
        assert h.join(timeout) == "cancelled"
        return
    if means == POLL:
        with pytest.raises(TimeoutError, match="did not finish within 0 s"):
            h.join(0)
    else:
        with pytest.raises(means):
            h.join(timeout)
    assert not h.is_cancelled()
    h.cancel()
    assert h.join(DEADLINE) == "cancelled"


def _stop(h: CriticalTaskExecutionHandle[Any], timeout: Any, asynchronous: bool) -> Any:
    if asynchronous:
        return asyncio.run(h.stop_async(timeout))
    return h.stop(timeout)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["stop", "stop_async"])
@matrix
def test_stop(sup: Supervisor, pipe: Pipe, timeout: Any, means: Any, asynchronous: bool) -> None:
    """Test stop() and stop_async(): forever lets a cooperating task return, 0 escalates at
    once (a task ignoring cancellation is killed), bad values raise and cancel nothing."""
    reader, writer = pipe()
    h: CriticalTaskExecutionHandle[Any]
    if means == FOREVER:
        h = sup.spawn(tasks.wait_for_cancel, "stop", args=(writer,))
        _ready(reader)
        assert _stop(h, timeout, asynchronous) == "cancelled"
        return
    h = sup.spawn(tasks.ignore_cancel, "stop", args=(writer,))
    _ready(reader)
    if means == POLL:
        with pytest.raises(TaskCrashedError, match="stopped on request") as info:
            _stop(h, 0, asynchronous)
        assert info.value.stopped
        return
    with pytest.raises(means):
        _stop(h, timeout, asynchronous)
    assert not h.is_cancelled()
    with pytest.raises(TaskCrashedError, match="stopped on request"):
        h.stop(0)


@matrix
def test_shutdown(pipe: Pipe, timeout: Any, means: Any) -> None:
    """Test shutdown(): forever lets a cooperating task return, 0 escalates at once, bad values
    raise and shut nothing down."""
    reader, writer = pipe()
    sup = Supervisor(grace_period=DEADLINE)  # the default would not escalate within the test
    h: CriticalTaskExecutionHandle[Any]
    try:
        if means == FOREVER:
            h = sup.spawn(tasks.wait_for_cancel, "shutdown", args=(writer,))
            _ready(reader)
            sup.shutdown(timeout)
            assert h.join(0) == "cancelled"
            return
        h = sup.spawn(tasks.ignore_cancel, "shutdown", args=(writer,))
        _ready(reader)
        if means == POLL:
            sup.shutdown(0)
            with pytest.raises(TaskCrashedError, match="stopped on request"):
                h.join(0)
            return
        with pytest.raises(means):
            sup.shutdown(timeout)
        assert not sup.closed
        assert not sup.token.is_cancelled()
        assert not h.is_cancelled()
        sup.shutdown(0)
        with pytest.raises(TaskCrashedError, match="stopped on request"):
            h.join(0)
    finally:
        sup.shutdown(0)


def test_shutdown_defaults_to_the_grace_period(pipe: Pipe) -> None:
    """Test that shutdown() with no timeout gives tasks the supervisor's grace period, then
    escalates; and that its signature says so."""
    default = inspect.signature(Supervisor.shutdown).parameters["timeout"].default
    assert repr(default) == "GRACE_PERIOD"
    reader, writer = pipe()
    sup = Supervisor(grace_period=0.1)
    h = sup.spawn(tasks.ignore_cancel, "stubborn", args=(writer,))
    _ready(reader)
    sup.shutdown()
    with pytest.raises(TaskCrashedError, match=r"within 0\.1 s of shutdown"):
        h.join(0)


def test_shutdown_none_waits_beyond_the_grace_period(pipe: Pipe) -> None:
    """Test that shutdown(None) waits for as long as a task takes to clean up, however short the
    supervisor's grace period: no signal is sent."""
    report, reported = pipe()
    told, tell = pipe()
    control_reader, control_writer = pipe()
    grace = 0.1
    sup = Supervisor(grace_period=grace)
    control = Supervisor(grace_period=grace)
    try:
        h = sup.spawn(contract_tasks.clean_up_when_told, "slow", args=(reported, told))
        assert _ready(report) == "ready"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            shutting = pool.submit(sup.shutdown, None)
            assert _ready(report) == "cancelled"
            # A control with the same grace period, shut down by default after this one began,
            # escalates its stubborn task: a shutdown(None) that escalated after the grace period
            # would be done by then too (an order, not a time).
            stubborn = control.spawn(tasks.ignore_cancel, "control", args=(control_writer,))
            _ready(control_reader)
            control.shutdown()
            with pytest.raises(TaskCrashedError, match="stopped on request"):
                stubborn.join(0)
            assert not shutting.done()
            tell.send("go")
            shutting.result(DEADLINE)
        assert h.join(0) == "cleaned up"
    finally:
        sup.shutdown(0)
        control.shutdown(0)


@matrix
def test_spawn_timeout(sup: Supervisor, timeout: Any, means: Any) -> None:
    """Test spawn(timeout=): forever is no limit; 0 gives the run no time at all (its token is
    cancelled as it starts, and a task that then returns has returned); bad values raise and
    start nothing."""
    if isinstance(means, type):
        with pytest.raises(means, match="timeout"):
            sup.spawn(tasks.token_state, "bad", timeout=timeout)
        assert not sup._backend.booted  # no process, not even the supervision thread
        return
    h = sup.spawn(tasks.token_state, "timed", timeout=timeout)
    if means == FOREVER:
        assert h.join(DEADLINE) == (False, None)
    else:
        assert h.join(DEADLINE) == (True, "Critical task 'timed' timed out after 0 s")


def test_spawn_timeout_zero_stops_a_task_that_ignores_it(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that a run with timeout=0 that ignores its cancelled token is killed after the grace
    period: it crashed for exceeding its timeout, and its parent is cancelled."""
    reader, writer = pipe()
    parent = CancellationToken()
    h = runtime.spawn(
        tasks.ignore_cancel, "no time", args=(writer,), parent_token=parent, timeout=0
    )
    _ready(reader)
    with pytest.raises(TaskCrashedError, match="exceeded its timeout of 0 s") as info:
        h.join(DEADLINE)
    assert not info.value.stopped
    assert parent.is_cancelled()


@matrix
def test_event_stream_get(sup: Supervisor, pipe: Pipe, timeout: Any, means: Any) -> None:
    """Test EventStream.get(): forever waits for the next event, 0 polls, bad values raise."""
    reader, writer = pipe()
    with sup.events() as events:
        h = sup.spawn(tasks.wait_for_cancel, "events", args=(writer,))
        _ready(reader)
        assert events.get(0).kind == "started"
        if means == FOREVER:
            h.cancel()  # the next event comes once the task has ended
            assert events.get(timeout).kind == "cancelled"
        elif means == POLL:
            with pytest.raises(TimeoutError):
                events.get(0)
        else:
            with pytest.raises(means):
                events.get(timeout)
        h.cancel()
        assert h.join(DEADLINE) == "cancelled"


@matrix
def test_token_wait(timeout: Any, means: Any) -> None:
    """Test CancellationToken.wait(): forever waits for the cancel, 0 polls, bad values raise."""
    token = CancellationToken()
    if means == FOREVER:
        canceller = threading.Thread(target=token.cancel, args=("from a thread",))
        canceller.start()
        assert token.wait(timeout) is True
        canceller.join(DEADLINE)
    elif means == POLL:
        assert token.wait(0) is False
    else:
        with pytest.raises(means):
            token.wait(timeout)


GRACE_MATRIX: list[tuple[object, type[Exception] | None]] = [
    (None, ValueError),
    (0, None),
    (math.inf, ValueError),
    (-1, ValueError),
    (math.nan, ValueError),
    ("1", TypeError),
    (True, TypeError),
]


@pytest.mark.parametrize(("grace", "error"), GRACE_MATRIX, ids=IDS)
def test_grace_period(grace: Any, error: type[Exception] | None) -> None:
    """Test Supervisor(grace_period=): the same checks, and it must be finite (it bounds how
    long tasks outlive a dead supervisor)."""
    if error is None:
        assert Supervisor(grace_period=grace).grace_period == 0.0
        return
    with pytest.raises(error, match="grace_period"):
        Supervisor(grace_period=grace)
