"""Restart policies (Erlang/OTP meanings), backoff, intensity and escalation, under every method."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import (
    CancellationToken,
    CriticalTaskError,
    Supervisor,
    TaskCrashedError,
    TaskFailedError,
)
from tests import daemon_tasks, tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]
FAST = (0.005, 0.02)  # backoff: short, so the tests are quick; still exercised


@pytest.fixture
def runs(tmp_path: Path) -> str:
    """A file each run of a task appends one byte to."""
    return str(tmp_path / "runs")


def _runs(path: str) -> int:
    return Path(path).stat().st_size if Path(path).exists() else 0


def test_transient_restarts_after_failures_until_success(runtime: Supervisor, runs: str) -> None:
    """Test that a transient task is rerun after failing and join() returns the final success."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.fail_until,
        "flaky",
        args=(runs, 3),
        parent_token=parent,
        restart="transient",
        backoff=FAST,
    )
    assert h.join(DEADLINE) == 3
    assert h.restarts == 2
    assert isinstance(h.last_failure, TaskFailedError)
    assert "run 2 failed" in str(h.last_failure)
    assert not parent.is_cancelled()


def test_transient_is_not_restarted_after_a_return(runtime: Supervisor, runs: str) -> None:
    """Test that a transient task that returns is done, with no restart."""
    h = runtime.spawn(daemon_tasks.count_run, "once", args=(runs,), restart="transient")
    assert h.join(DEADLINE) == 1
    assert (h.restarts, h.last_failure) == (0, None)


def test_transient_restarts_after_crashes(runtime: Supervisor, runs: str) -> None:
    """Test that a crash (SIGKILL) is restarted like a failure and recorded in last_failure."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.crash_until,
        "crashy",
        args=(runs, 2),
        parent_token=parent,
        restart="transient",
        backoff=FAST,
    )
    assert h.join(DEADLINE) == 2
    assert isinstance(h.last_failure, TaskCrashedError)
    assert h.last_failure.signal == "SIGKILL"
    assert not parent.is_cancelled()


def test_permanent_escalates_past_its_intensity(runtime: Supervisor, runs: str) -> None:
    """Test that a permanent task is rerun after returning, and the 4th end within the period
    cancels the parent with a cause that says so and lists the runs."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.count_run,
        "forever",
        args=(runs,),
        parent_token=parent,
        restart="permanent",
        max_restarts=3,
        period=60.0,
        backoff=FAST,
    )
    with pytest.raises(CriticalTaskError) as info:
        h.join(DEADLINE)
    assert _runs(runs) == 4
    assert h.restarts == 3
    assert parent.is_cancelled()
    cause = parent.cause or ""
    assert "exceeded its restart intensity (more than 3 restarts within 60 s)" in cause
    assert "[4] returned normally" in cause
    assert "restart intensity" in str(info.value)


def test_failure_escalation_lists_the_failures(runtime: Supervisor, runs: str) -> None:
    """Test that exceeding the intensity with failures raises the last failure, noted."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.fail_until,
        "hopeless",
        args=(runs, 100),
        parent_token=parent,
        restart="transient",
        max_restarts=2,
        backoff=FAST,
    )
    with pytest.raises(TaskFailedError, match="run 3 failed") as info:
        h.join(DEADLINE)
    assert any("restart intensity" in note for note in info.value.__notes__)
    assert h.last_failure is info.value
    cause = parent.cause or ""
    for run in (1, 2, 3):
        assert f"[{run}] Critical task 'hopeless' failed: RuntimeError: run {run} failed" in cause


def test_zero_restarts_escalates_at_once(runtime: Supervisor, runs: str) -> None:
    """Test that max_restarts=0 escalates on the first failure."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.fail_until,
        "brittle",
        args=(runs, 2),
        parent_token=parent,
        restart="transient",
        max_restarts=0,
    )
    with pytest.raises(TaskFailedError):
        h.join(DEADLINE)
    assert _runs(runs) == 1
    assert "restart intensity" in (parent.cause or "")


def test_each_run_gets_a_fresh_child_token(runtime: Supervisor, runs: str) -> None:
    """Test that a run which cancelled its own token does not pass it on to the next run."""
    h = runtime.spawn(
        daemon_tasks.cancel_own_token_then_fail,
        "fresh",
        args=(runs,),
        restart="transient",
        backoff=FAST,
    )
    assert h.join(DEADLINE) is True
    assert h.restarts == 1


def test_detached_task_escalates_with_nobody_joining(runtime: Supervisor, runs: str) -> None:
    """Test that escalation is decided by the supervisor, not by whoever joins."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.fail_until,
        "orphan",
        args=(runs, 100),
        parent_token=parent,
        restart="permanent",
        max_restarts=1,
        backoff=FAST,
    )
    h.detach()
    del h
    assert parent.wait(DEADLINE)
    assert "restart intensity" in (parent.cause or "")


def test_cancel_during_backoff_makes_the_last_outcome_final(runtime: Supervisor, runs: str) -> None:
    """Test that cancel() between runs publishes the last outcome at once and starts no run."""
    parent = CancellationToken()
    with runtime.events() as events:
        h = runtime.spawn(
            daemon_tasks.fail_until,
            "slow restart",
            args=(runs, 100),
            parent_token=parent,
            restart="transient",
            backoff=(DEADLINE, DEADLINE),
        )
        assert [events.get(DEADLINE).kind for _ in range(2)] == ["started", "failed"]
        assert [t.state for t in runtime.tasks()] == ["restarting"]
        h.cancel()
        with pytest.raises(TaskFailedError, match="run 1 failed"):
            h.join(DEADLINE)
    assert _runs(runs) == 1
    assert runtime.tasks() == []
    # As for a temporary task, a final failure cancels the parent.
    assert parent.is_cancelled()


def test_stop_ends_a_permanent_task_for_good(runtime: Supervisor, runs: str, pipe: Pipe) -> None:
    """Test that stop() is not followed by a restart and leaves the parent alone."""
    parent = CancellationToken()
    reader, writer = pipe()
    h = runtime.spawn(
        daemon_tasks.fail_then_wait,
        "service",
        args=(runs, writer),
        parent_token=parent,
        restart="permanent",
        backoff=FAST,
    )
    assert reader.poll(DEADLINE)
    assert reader.recv() == "run 2"
    assert h.stop(DEADLINE) == "cancelled"
    assert h.restarts == 1
    assert _runs(runs) == 2
    assert not parent.is_cancelled()


def test_cancelled_parent_stops_restarts(runtime: Supervisor, runs: str, pipe: Pipe) -> None:
    """Test that a run ending because its parent was cancelled is final."""
    parent = CancellationToken()
    reader, writer = pipe()
    h = runtime.spawn(
        tasks.wait_for_cancel,
        "follower",
        args=(writer,),
        parent_token=parent,
        restart="permanent",
    )
    assert reader.poll(DEADLINE)
    parent.cancel("shutting down")
    assert h.join(DEADLINE) == "cancelled"
    assert h.restarts == 0


def test_parent_cancelled_during_backoff_starts_no_run(runtime: Supervisor, runs: str) -> None:
    """Test that a restart due after its parent was cancelled is not made: the failure is final."""
    parent = CancellationToken()
    with runtime.events() as events:
        h = runtime.spawn(
            daemon_tasks.fail_until,
            "late restart",
            args=(runs, 100),
            parent_token=parent,
            restart="transient",
            backoff=(1.0, 1.0),
        )
        assert [events.get(DEADLINE).kind for _ in range(2)] == ["started", "failed"]
        parent.cancel("shutting down")
        with pytest.raises(TaskFailedError, match="run 1 failed"):
            h.join(DEADLINE)
        events.close()
        assert "restarted" not in [event.kind for event in events]
    assert h.restarts == 0
    assert _runs(runs) == 1


@pytest.mark.parametrize("cancelled", ["parent", "root"])
def test_cancellation_during_backoff_publishes_at_once(
    runtime: Supervisor, runs: str, cancelled: str
) -> None:
    """Test that a parent (or root) cancelled during a backoff ends the wait before its timer."""
    parent = CancellationToken() if cancelled == "parent" else runtime.token
    with runtime.events() as events:
        h = runtime.spawn(
            daemon_tasks.fail_until,
            "long backoff",
            args=(runs, 100),
            parent_token=parent if cancelled == "parent" else None,
            restart="permanent",
            # At least 2 * DEADLINE (the jitter's lower bound): join(DEADLINE) below can only
            # succeed if the cancellation ends the backoff, never because its timer fired.
            backoff=(4 * DEADLINE, 4 * DEADLINE),
        )
        assert [events.get(DEADLINE).kind for _ in range(2)] == ["started", "failed"]
        assert [t.state for t in runtime.tasks()] == ["restarting"]
        parent.cancel("the application is shutting down")
        with pytest.raises(TaskFailedError, match="run 1 failed"):
            h.join(DEADLINE)
        assert runtime.tasks() == []
        events.close()
        assert "restarted" not in [event.kind for event in events]
    assert (h.restarts, _runs(runs)) == (0, 1)
    assert parent.cause == "the application is shutting down"


def test_shutdown_during_backoff_resolves_the_handle(start_method: str, runs: str) -> None:
    """Test that a task waiting to restart when its supervisor shuts down is final at once."""
    sup = Supervisor(start_method=start_method, grace_period=1.0)
    with sup.events() as events:
        h = sup.spawn(
            daemon_tasks.fail_until,
            "pending",
            args=(runs, 100),
            restart="permanent",
            backoff=(DEADLINE, DEADLINE),
        )
        assert [events.get(DEADLINE).kind for _ in range(2)] == ["started", "failed"]
        started = time.monotonic()
        sup.shutdown()
        assert time.monotonic() - started < DEADLINE / 2
    with pytest.raises(TaskFailedError):
        h.join(0)


def test_backoff_delays_the_restart(runtime: Supervisor, runs: str) -> None:
    """Test that the restart waits at least half the first backoff (the jitter's lower bound)."""
    with runtime.events() as events:
        h = runtime.spawn(
            daemon_tasks.fail_until,
            "patient",
            args=(runs, 2),
            restart="transient",
            backoff=(0.3, 0.3),
        )
        assert h.join(DEADLINE) == 2
        seen: dict[str, float] = {}
        while len(seen) < 3:
            event = events.get(DEADLINE)
            seen.setdefault(event.kind, event.time)
    assert seen["restarted"] - seen["failed"] >= 0.15


def test_restart_is_logged(
    runtime: Supervisor, runs: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that procsup logs each restart at WARNING and the failure at ERROR."""
    caplog.set_level(logging.WARNING, logger="procsup")
    h = runtime.spawn(
        daemon_tasks.fail_until, "noted", args=(runs, 2), restart="transient", backoff=FAST
    )
    assert h.join(DEADLINE) == 2
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "procsup"]
    assert ("ERROR", "Critical task 'noted' failed: RuntimeError: run 1 failed") in messages
    assert any(
        level == "WARNING" and text.startswith("Restarting critical task 'noted' in ")
        for level, text in messages
    )


BAD: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"restart": "sometimes"}, ValueError),
    ({"max_restarts": -1}, ValueError),
    ({"max_restarts": 1.5}, TypeError),
    ({"period": 0}, ValueError),
    ({"period": math.nan}, ValueError),
    ({"backoff": (2.0, 1.0)}, ValueError),
    ({"backoff": 1.0}, TypeError),
    ({"memory_limit": 0}, ValueError),
    ({"memory_limit": -(2**20)}, ValueError),
    ({"memory_limit": "1G"}, TypeError),
    ({"cpu_time_limit": 0}, ValueError),
    ({"cpu_time_limit": -1.0}, ValueError),
    ({"timeout": -1}, ValueError),
    ({"timeout": math.nan}, ValueError),
    ({"timeout": True}, TypeError),
    ({"timeout": "5"}, TypeError),
    ({"capture_output": "yes"}, TypeError),
]


@pytest.mark.parametrize(("options", "error"), BAD, ids=[str(opts) for opts, _ in BAD])
def test_bad_options_raise_before_any_process_starts(
    options: dict[str, Any], error: type[Exception]
) -> None:
    """Test that a bad restart, limit or timeout raises at spawn and starts no process."""
    sup = Supervisor()
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(error):
        sup.spawn(tasks.return_value, "bad", args=(1,), **options)
    assert {p.pid for p in psutil.Process().children()} == before
    assert not sup._backend.booted  # not even the supervision thread was started
    sup.shutdown()
