"""Parts of the public contract no other file covers: preload, kwargs, the sliding restart
window, stop(timeout=None), concurrent spawn(), events(maxlen) and a raising on_event callback."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

import procsup._supervision.lifecycle
from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    EventStream,
    Supervisor,
    TaskEvent,
    TaskFailedError,
)
from tests import contract_tasks, tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


def _kinds(events: EventStream, count: int) -> list[str]:
    return [events.get(DEADLINE).kind for _ in range(count)]


# ---------------------------------------------------------------- preload


@pytest.mark.parametrize(
    ("preload", "missing"),
    [
        ("tests.contract_preloadd", "tests.contract_preloadd"),
        (["json", "no_such_module_procsup"], "no_such_module_procsup"),
        (["no_such_package_procsup.sub"], "no_such_package_procsup"),
        (["xml.etree.NoSuchTree"], "xml.etree.NoSuchTree"),
    ],
)
def test_preload_that_cannot_be_imported_raises_naming_it(preload: Any, missing: str) -> None:
    """Test that a preload module that cannot be found raises ModuleNotFoundError naming it."""
    with pytest.raises(ModuleNotFoundError, match="preload module") as info:
        Supervisor(preload=preload)
    assert f"no module named {missing!r}" in str(info.value)
    name = preload if isinstance(preload, str) else preload[-1]
    assert info.value.name == name
    assert repr(name) in str(info.value)


def test_preload_imports_nothing_here() -> None:
    """Test that checking a preload list runs no module: a package is looked into, not run."""
    Supervisor(preload=["tests.contract_unrun.sub", "os.path"]).shutdown()
    assert "tests.contract_unrun" not in sys.modules  # its __init__ raises


def test_preload_is_imported_before_the_task(start_method: str) -> None:
    """Test that a preload module is imported where tasks are forked from, before they run."""
    if start_method == "spawn":
        pytest.skip("spawn tasks exec a fresh interpreter: nothing is preloaded for them")
    with Supervisor(start_method=start_method, preload=[contract_tasks.PRELOADED]) as sup:
        assert sup.spawn(contract_tasks.preloaded, "preloaded").join(DEADLINE) is True


def test_preload_that_raises_fails_the_first_spawn(start_method: str) -> None:
    """Test that a preload module that is found but raises when imported makes the first spawn
    raise ImportError naming it and its error, before any task starts, under every method."""
    sup = Supervisor(start_method=start_method, preload=["tests.contract_unrun"])
    try:
        for _ in range(2):  # and every spawn after it: nothing half-started is left behind
            with pytest.raises(ImportError, match=r"module 'tests\.contract_unrun'") as info:
                sup.spawn(tasks.return_value, "never", args=(1,))
            assert info.value.name == "tests.contract_unrun"
            assert "AssertionError: tests.contract_unrun was imported" in str(info.value)
        assert sup.tasks() == []
    finally:
        sup.shutdown()
    assert "tests.contract_unrun" not in sys.modules


# ---------------------------------------------------------------- kwargs


def test_kwargs_reach_the_task(runtime: Supervisor) -> None:
    """Test that spawn(kwargs=...) and the handle's kwargs reach the task, a token among them."""
    other = CancellationToken()
    h = runtime.spawn(
        contract_tasks.echo,
        "kwargs",
        args=(1, "two"),
        kwargs={"three": [3.0], "four": {"n": 4}, "cancel": other},
    )
    assert h.join(DEADLINE) == ((1, "two"), {"three": [3.0], "four": {"n": 4}})
    assert other.cause == "cancelled through kwargs"
    handle = CriticalTaskExecutionHandle(
        contract_tasks.echo,
        CancellationToken(),
        "handle kwargs",
        kwargs={"k": "v"},
        runtime=runtime,
    )
    assert handle.join(DEADLINE) == ((), {"k": "v"})


# ---------------------------------------------------------------- restart intensity


class _Clock:
    """Stands for the time module in procsup._supervision.lifecycle: its monotonic clock is set by
    the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.time = time.time

    def monotonic(self) -> float:
        return self.now


def test_restart_window_slides(
    runtime: Supervisor, pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that restarts older than ``period`` stop counting: with max_restarts=2 in 1 s, failures
    at 0, 0.6 and 1.2 s are restarted (the one at 0 has left the window), the one at 1.3 is the
    third restart within 1 s and escalates (a window fixed at 0..1 s would have restarted it)."""
    clock = _Clock()
    monkeypatch.setattr(procsup._supervision.lifecycle, "time", clock)
    told, tell = pipe()
    parent = CancellationToken()
    with runtime.events() as events:
        h = runtime.spawn(
            contract_tasks.fail_when_told,
            "sliding",
            args=(told,),
            parent_token=parent,
            restart="transient",
            max_restarts=2,
            period=1.0,
            backoff=(0.0, 0.0),
        )
        assert _kinds(events, 1) == ["started"]
        for run, at in enumerate((0.0, 0.6, 1.2), 1):
            clock.now = 1000.0 + at  # read by the supervision thread when the run fails
            tell.send(run)
            assert _kinds(events, 2) == ["failed", "restarted"], f"run {run}"
            assert h.restarts == run
        clock.now = 1001.3
        tell.send(4)
        assert _kinds(events, 2) == ["failed", "escalated"]
    with pytest.raises(TaskFailedError, match="told to fail: 4"):
        h.join(DEADLINE)
    assert h.restarts == 3
    assert "more than 2 restarts within 1 s" in (parent.cause or "")


# ---------------------------------------------------------------- stop(timeout=None)


def test_stop_without_timeout_waits_for_the_task(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that stop(timeout=None) cancels, then waits as long as the task takes: no signal."""
    report, reported = pipe()
    told, tell = pipe()
    parent = CancellationToken()
    h = runtime.spawn(
        contract_tasks.clean_up_when_told,
        "slow cleanup",
        args=(reported, told),
        parent_token=parent,
    )
    assert report.poll(DEADLINE)
    assert report.recv() == "ready"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(h.stop, None)
        assert report.poll(DEADLINE)
        assert report.recv() == "cancelled"
        # Longer than the 1 s stop() waits between SIGTERM and SIGKILL: still no escalation.
        with pytest.raises(concurrent.futures.TimeoutError):
            stopping.result(1.5)
        tell.send("go")
        assert stopping.result(DEADLINE) == "cleaned up"
    assert h.exitcode == 0
    assert not parent.is_cancelled()


# ---------------------------------------------------------------- concurrent spawn()

THREADS = 16
PER_THREAD = 3


def test_concurrent_spawns_from_many_threads(runtime: Supervisor) -> None:
    """Test that 16 threads spawning at once each get their own tasks' results, nothing leaks."""
    barrier = threading.Barrier(THREADS, timeout=DEADLINE)

    def spawn_some(thread: int) -> list[CriticalTaskExecutionHandle[Any]]:
        barrier.wait()
        return [
            runtime.spawn(tasks.return_value, f"t{thread}.{i}", args=((thread, i),))
            for i in range(PER_THREAD)
        ]

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        batches = [pool.submit(spawn_some, thread) for thread in range(THREADS)]
        handles = [h for batch in batches for h in batch.result(DEADLINE)]
    assert len({h.pid for h in handles}) == THREADS * PER_THREAD
    results = {h.description: h.join(DEADLINE) for h in handles}
    assert results == {
        f"t{thread}.{i}": (thread, i) for thread in range(THREADS) for i in range(PER_THREAD)
    }
    assert runtime.tasks() == []
    assert not runtime.token.is_cancelled()


# ---------------------------------------------------------------- events(maxlen)


def test_events_keeps_the_newest_maxlen(runtime: Supervisor) -> None:
    """Test that a stream keeps its newest ``maxlen`` unread events and counts the rest dropped."""
    # Streams get each event in the order they were opened: once ``every`` has an event,
    # ``newest`` has it too.
    with runtime.events(maxlen=2) as newest, runtime.events() as every:
        for i in range(3):
            assert runtime.spawn(tasks.return_value, f"short {i}", args=(i,)).join(DEADLINE) == i
            pair = [every.get(DEADLINE), every.get(DEADLINE)]
            assert [(e.kind, e.description) for e in pair] == [
                ("started", f"short {i}"),
                ("finished", f"short {i}"),
            ]
        assert newest.dropped == 4
        kept = [newest.get(0), newest.get(0)]
        assert [(e.kind, e.description) for e in kept] == [
            ("started", "short 2"),
            ("finished", "short 2"),
        ]
        with pytest.raises(TimeoutError):
            newest.get(0)
        assert newest.dropped == 4
    with pytest.raises(ValueError, match="maxlen"):
        runtime.events(maxlen=0)


# ---------------------------------------------------------------- on_event


def test_raising_event_callback_is_logged_and_supervision_goes_on(
    runtime: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that an on_event callback that raises is logged with its traceback, every other
    subscriber still gets every event, and outcomes are still delivered."""
    caplog.set_level(logging.ERROR, logger="procsup")
    seen: queue.SimpleQueue[TaskEvent] = queue.SimpleQueue()

    def broken(event: TaskEvent) -> None:
        raise RuntimeError(f"subscriber bug on {event.kind}")

    remove = runtime.on_event(broken)
    runtime.on_event(seen.put)  # called after ``broken``: once it has an event, so has broken
    parent = CancellationToken()
    assert runtime.spawn(tasks.return_value, "fine", args=(7,)).join(DEADLINE) == 7
    # The last event of a run may come just after join() returns: wait for it before going on.
    assert [(e.kind, e.description) for e in _drain(seen, 2)] == [
        ("started", "fine"),
        ("finished", "fine"),
    ]
    failing = runtime.spawn(tasks.fail, "failing", args=("boom",), parent_token=parent)
    with pytest.raises(TaskFailedError, match="boom"):
        failing.join(DEADLINE)
    assert parent.is_cancelled()
    assert [(e.kind, e.description) for e in _drain(seen, 2)] == [
        ("started", "failing"),
        ("failed", "failing"),
    ]
    logged = [r for r in caplog.records if "event callback raised" in r.getMessage()]
    assert [r.getMessage().rsplit(" ", 1)[-1] for r in logged] == [
        "started",
        "finished",
        "started",
        "failed",
    ]
    assert all(r.name == "procsup" and r.levelno == logging.ERROR for r in logged)
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in logged)
    remove()
    assert runtime.spawn(tasks.return_value, "after", args=(8,)).join(DEADLINE) == 8
    assert [e.kind for e in _drain(seen, 2)] == ["started", "finished"]
    assert len([r for r in caplog.records if "event callback raised" in r.getMessage()]) == 4


def _drain(events: queue.SimpleQueue[TaskEvent], count: int) -> list[TaskEvent]:
    return [events.get(timeout=DEADLINE) for _ in range(count)]


# ---------------------------------------------------------------- nothing fails silently


class _Records(logging.Handler):
    """Collects the records of one logger and lets a test wait for them (they come from a
    thread of procsup's)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put(record)


def test_signal_bridge_logs_a_failed_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a shutdown() failing on the second signal is logged with its traceback, and the
    signals thread lives on."""
    sup = Supervisor()

    def broken_shutdown(timeout: object = None) -> None:
        raise RuntimeError("shutdown broke")

    records = _Records()
    logging.getLogger("procsup").addHandler(records)
    try:
        sup.install_signal_handlers()
        bridge = sup._signals
        assert bridge is not None
        monkeypatch.setattr(sup, "shutdown", broken_shutdown)
        for _ in range(2):  # what the handler does on SIGTERM, without signalling pytest
            bridge._handler(signal.SIGTERM, None)
        record = records.records.get(timeout=DEADLINE)
        assert record.getMessage() == "procsup could not shut down on SIGTERM (signal 15)"
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "shutdown broke"
        assert sup.token.cause == "Supervisor received SIGTERM (signal 15)"
        assert bridge._thread.is_alive()
    finally:
        logging.getLogger("procsup").removeHandler(records)
        monkeypatch.undo()
        sup.shutdown()  # on the main thread: restores the handlers, ends the signals thread
