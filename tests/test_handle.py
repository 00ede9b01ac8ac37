"""The 11 tests of critical.rs, each under every start method, with handshakes for the sleeps.

Seed test N is ``test_seed_NN_*``; what each asserts beyond the seed is said in its docstring.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    NotDetachedError,
    Supervisor,
    TaskFailedError,
    TaskPanickedError,
)
from tests import tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


def start(
    runtime: Supervisor,
    fn: Callable[..., Any],
    parent: CancellationToken,
    description: str,
    *args: Any,
) -> CriticalTaskExecutionHandle[Any]:
    return CriticalTaskExecutionHandle.new_with_runtime(fn, parent, description, runtime, args=args)


def handshake(reader: Connection) -> Any:
    assert reader.poll(DEADLINE), "the task never reached its handshake"
    return reader.recv()


def test_seed_01_successful_task_completion(runtime: Supervisor, tmp_path: Path) -> None:
    """Test that a successful task returns None, did its work and leaves the parent alone."""
    parent = CancellationToken()
    done = tmp_path / "done"
    handle = start(runtime, tasks.touch, parent, "test-success-task", str(done))
    assert handle.join(DEADLINE) is None
    assert done.read_text() == "done"
    assert not parent.is_cancelled()
    assert handle.exitcode == 0


def test_seed_02_task_failure_cancels_parent_token(runtime: Supervisor) -> None:
    """Test that an error is propagated with context and cancels the parent before join returns."""
    parent = CancellationToken()
    handle = start(runtime, tasks.fail, parent, "test-failure-task")
    with pytest.raises(TaskFailedError) as info:
        handle.join(DEADLINE)
    assert str(info.value) == (
        "Critical task 'test-failure-task' failed: RuntimeError: Critical task failed!"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "Critical task failed!"
    assert parent.is_cancelled()  # no sleep needed: cancelled before the outcome is published
    assert parent.cause == str(info.value)


def test_seed_03_task_panic_is_caught_and_reported(runtime: Supervisor) -> None:
    """Test that a BaseException is contained, reported as a panic and cancels the parent."""
    parent = CancellationToken()
    handle = start(runtime, tasks.panic, parent, "test-panic-task")
    with pytest.raises(TaskPanickedError) as info:
        handle.join(DEADLINE)
    assert "panicked" in str(info.value)
    assert "Something went terribly wrong!" in str(info.value)
    assert isinstance(info.value.__cause__, tasks.Panic)
    assert parent.is_cancelled()


def test_seed_04_graceful_shutdown_via_cancellation_token(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that cancel() stops a task after some work, cleanly, without cancelling the parent.

    The test paces the work (a handshake per unit), so the units done before the cancel are
    exactly three, however busy the machine: the seed's "0 < done < total", made exact.
    """
    parent = CancellationToken()
    progress, progress_writer = pipe()
    go_reader, go = pipe()
    handle = start(
        runtime, tasks.work_in_steps, parent, "test-graceful-shutdown", progress_writer, go_reader
    )
    progress_writer.close()
    go_reader.close()
    for unit in (1, 2, 3):
        assert handshake(progress) == unit
        if unit < 3:
            go.send("next")
    handle.cancel()
    go.send("next")  # the task looks at its token before the next unit
    assert handle.join(DEADLINE) == 3
    assert not parent.is_cancelled()


def test_seed_05_multiple_critical_tasks_one_failure(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that one failing task cancels its siblings through the shared parent."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle1 = start(runtime, tasks.wait_for_cancel, parent, "long-running-task", writer)
    writer.close()
    handshake(reader)
    handle2 = start(runtime, tasks.fail, parent, "failing-task", "Task 2 failed!")
    with pytest.raises(TaskFailedError, match="Task 2 failed!"):
        handle2.join(DEADLINE)
    assert parent.is_cancelled()
    assert handle1.join(DEADLINE) == "cancelled"  # stopped early, did not complete normally


def test_seed_06_status_checking_methods(runtime: Supervisor, pipe: Pipe) -> None:
    """Test is_finished() and is_cancelled() before and after cancel(), and after join()."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = start(runtime, tasks.wait_for_cancel, parent, "status-test-task", writer)
    writer.close()
    handshake(reader)
    assert not handle.is_finished()
    assert not handle.is_cancelled()
    handle.cancel()
    assert handle.is_cancelled()
    assert handle.join(DEADLINE) == "cancelled"
    assert handle.is_finished()
    assert not parent.is_cancelled()


def test_seed_07_task_with_select_pattern(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that an async task racing work against token.cancelled() is interrupted mid-await."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = start(runtime, tasks.select_pattern, parent, "select-pattern-task", writer)
    writer.close()
    handshake(reader)
    handle.cancel()
    assert handle.join(DEADLINE) is None  # None: cancelled before the work completed


def test_seed_08_timeout_behavior(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that a join() timeout is not a failure: nothing is cancelled and join can be retried."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = start(runtime, tasks.wait_for_cancel, parent, "long-task", writer)
    writer.close()
    handshake(reader)
    with pytest.raises(TimeoutError, match=r"'long-task'.*still running"):
        handle.join(timeout=0.1)
    assert not parent.is_cancelled()
    assert not handle.is_cancelled()
    assert not handle.is_finished()
    handle.cancel()
    assert handle.join(DEADLINE) == "cancelled"


def test_seed_09_panic_triggers_immediate_parent_cancellation(runtime: Supervisor) -> None:
    """Test that a panic cancels the parent with nobody joining; join still reports it."""
    parent = CancellationToken()
    handle = start(runtime, tasks.panic, parent, "immediate-panic-task", "Critical failure!")
    assert parent.wait(DEADLINE), "Parent token should be cancelled when the task panics"
    assert parent.cause == "Critical task 'immediate-panic-task' panicked: Panic: Critical failure!"
    with pytest.raises(TaskPanickedError):
        handle.join(DEADLINE)


def test_seed_10_error_triggers_immediate_parent_cancellation(runtime: Supervisor) -> None:
    """Test that an error cancels the parent with nobody joining; join still reports it."""
    parent = CancellationToken()
    handle = start(runtime, tasks.fail, parent, "immediate-error-task", "Critical error!")
    assert parent.wait(DEADLINE), "Parent token should be cancelled when the task errors"
    assert parent.cause == (
        "Critical task 'immediate-error-task' failed: RuntimeError: Critical error!"
    )
    with pytest.raises(TaskFailedError):
        handle.join(DEADLINE)


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    """Collect what reaches sys.unraisablehook instead of letting pytest turn it into an error."""
    seen: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.exc_value))
    return seen


def test_seed_11_task_detach(runtime: Supervisor, unraisable: list[BaseException | None]) -> None:
    """Test that dropping an undetached handle reports NotDetachedError; the task lives on."""
    parent = CancellationToken()
    handle = start(runtime, tasks.return_value, parent, "test-detach-task", 1)
    task = handle._task
    del handle
    gc.collect()
    assert len(unraisable) == 1
    error = unraisable[0]
    assert isinstance(error, NotDetachedError)
    assert str(error).startswith("Critical task was not detached prior to drop!")
    assert error.description == "test-detach-task"
    assert task.future.result(DEADLINE) == 1  # still supervised after the drop
    assert not parent.is_cancelled()


def test_detached_or_joined_handles_drop_silently(
    runtime: Supervisor, unraisable: list[BaseException | None]
) -> None:
    """Test that detach(), join() and a timed-out join() all discharge the handle."""
    parent = CancellationToken()
    detached = start(runtime, tasks.return_value, parent, "detached", 1)
    detached.detach()
    task = detached._task
    joined = start(runtime, tasks.return_value, parent, "joined", 2)
    assert joined.join(DEADLINE) == 2
    del detached, joined
    gc.collect()
    assert unraisable == []
    assert task.future.result(DEADLINE) == 1


def test_with_block_without_join_raises(runtime: Supervisor) -> None:
    """Test that leaving a with block without join() or detach() raises NotDetachedError."""
    parent = CancellationToken()
    with (
        pytest.raises(NotDetachedError, match="not detached"),
        start(runtime, tasks.return_value, parent, "with-task", 3) as handle,
    ):
        pass
    assert handle._task.future.result(DEADLINE) == 3
    with start(runtime, tasks.return_value, parent, "with-joined", 4) as joined:
        assert joined.join(DEADLINE) == 4


def test_new_uses_the_default_supervisor(tmp_path: Path) -> None:
    """Test seed-parity new(): the process-wide default supervisor, forkserver where available."""
    parent = CancellationToken()
    done = tmp_path / "done"
    handle = CriticalTaskExecutionHandle.new(tasks.touch, parent, "default", args=(str(done),))
    assert handle.join(DEADLINE) is None
    assert done.exists()
    from procsup import default_supervisor

    assert default_supervisor().start_method == "forkserver"
    assert default_supervisor() is default_supervisor()


def test_join_again_and_attributes(runtime: Supervisor) -> None:
    """Test that join() may be repeated, and pid/exitcode/description once reaped."""
    parent = CancellationToken()
    handle = start(runtime, tasks.return_value, parent, "again", {"a": [1, 2]})
    assert handle.join(DEADLINE) == {"a": [1, 2]}
    assert handle.join(0) == {"a": [1, 2]}
    assert handle.exitcode == 0
    assert handle.pid > 0
    assert handle.description == "again"
    failing = start(runtime, tasks.fail, parent, "fails twice")
    for _ in range(2):
        with pytest.raises(TaskFailedError):
            failing.join(DEADLINE)


def test_join_async_and_async_target(runtime: Supervisor) -> None:
    """Test await join_async() and an async def target run in a fresh loop in the child."""
    parent = CancellationToken()

    async def main() -> Any:
        handle = start(runtime, tasks.async_value, parent, "async", [1])
        return await asyncio.wait_for(handle.join_async(), DEADLINE)

    assert asyncio.run(main()) == [1]


def test_parent_already_cancelled_starts_cancelled_task(runtime: Supervisor) -> None:
    """Test that a task whose parent is cancelled still starts, with a cancelled token."""
    parent = CancellationToken()
    parent.cancel("early")
    handle = start(runtime, tasks.token_state, parent, "born-cancelled")
    assert handle.join(DEADLINE) == (True, "early")
    assert handle.is_cancelled()


def test_token_in_args_crosses_both_ways(runtime: Supervisor) -> None:
    """Test that a token passed in args, cancelled by the task, is seen cancelled here."""
    parent = CancellationToken()
    other = CancellationToken()
    handle = start(runtime, tasks.cancel_passed_token, parent, "cross", other)
    assert handle.join(DEADLINE) is True
    assert other.is_cancelled()
    assert other.cause == "cancelled by the task"
    assert not parent.is_cancelled()


def test_logging(runtime: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    """Test the seed's log lines: success at DEBUG, failure at ERROR."""
    caplog.set_level("DEBUG", logger="procsup")
    parent = CancellationToken()
    start(runtime, tasks.return_value, parent, "logged-ok", 1).join(DEADLINE)
    with pytest.raises(TaskFailedError):
        start(runtime, tasks.fail, parent, "logged-fail", "boom").join(DEADLINE)
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "procsup"]
    assert ("DEBUG", "Critical task 'logged-ok' completed successfully") in records
    assert ("ERROR", "Critical task 'logged-fail' failed: RuntimeError: boom") in records
