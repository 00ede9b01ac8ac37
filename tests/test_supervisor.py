"""Supervisor: one thread for many tasks, stop/shutdown escalation, bad input, nesting."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import (
    CancellationToken,
    CriticalTaskError,
    CriticalTaskExecutionHandle,
    Supervisor,
    TaskCrashedError,
    TaskEvent,
    TaskFailedError,
)
from procsup._supervision.monitor import Monitor, TaskRecord
from tests import executor_items, newcomer_tasks, tasks
from tests.conftest import process_gone
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


def _supervisor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "procsup-supervisor"]


def test_one_thread_for_many_tasks(runtime: Supervisor) -> None:
    """Test that 20 concurrent tasks share the supervisor's single thread."""
    parent = CancellationToken()
    handles = [
        runtime.spawn(tasks.wait_for_cancel, f"t{i}", parent_token=parent) for i in range(20)
    ]
    assert len(_supervisor_threads()) == 1
    parent.cancel("done")
    assert [h.join(DEADLINE) for h in handles] == ["cancelled"] * 20


def test_stop_returns_like_join_when_the_task_cooperates(runtime: Supervisor) -> None:
    """Test that stop() on a task that honours cancellation returns its value, no signal sent."""
    parent = CancellationToken()
    handle = runtime.spawn(tasks.wait_for_cancel, "coop", parent_token=parent)
    assert handle.stop(timeout=DEADLINE) == "cancelled"
    assert handle.exitcode == 0
    assert not parent.is_cancelled()


def test_stop_escalates_to_sigkill_and_leaves_the_parent(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that stop() kills a task that ignores both cancellation and SIGTERM."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = runtime.spawn(tasks.ignore_sigterm, "stubborn", args=(writer,), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    with pytest.raises(TaskCrashedError) as info:
        handle.stop(timeout=0.1)
    error = info.value
    assert error.stopped
    assert error.signal == "SIGKILL"
    assert "stopped on request" in str(error)
    assert "did not honour cancellation within 0.1 s" in str(error)
    assert not parent.is_cancelled()


def test_stop_kills_the_whole_tree(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that stop() SIGTERMs the task's process group: its own children die with it."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = runtime.spawn(tasks.tree_ignoring_cancel, "tree", args=(writer,), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    grandchild = reader.recv()
    with pytest.raises(TaskCrashedError) as info:
        handle.stop(timeout=0)
    assert info.value.signal == "SIGTERM"
    assert process_gone(grandchild, DEADLINE)
    assert not parent.is_cancelled()


def test_shutdown_from_several_threads_at_once() -> None:
    """Test that shutdown() called by three threads at once returns in each, none raising: the
    supervision thread's fds are closed once (a second close raised EBADF, or closed an fd just
    reused by another thread). Five rounds, the threads let go together by a barrier."""
    for _ in range(5):
        sup = Supervisor(grace_period=DEADLINE)
        handles = [sup.spawn(tasks.wait_for_cancel, f"waits {i}") for i in range(2)]
        together = threading.Barrier(3, timeout=DEADLINE)
        errors: list[BaseException] = []

        def shut_down(
            sup: Supervisor = sup,
            together: threading.Barrier = together,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                together.wait()
                sup.shutdown()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=shut_down) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        assert [handle.join(0) for handle in handles] == ["cancelled", "cancelled"]


def test_shutdown_escalates_stragglers_and_reaps(start_method: str, pipe: Pipe) -> None:
    """Test that shutdown() cancels, waits for a task that honours it, and stops one that does not.

    Each under a supervisor of its own, so that no outcome races a grace period: the cooperative
    task gets a grace that only a hang would use up (shutdown returns as soon as it is done), the
    stubborn one a short grace that it always uses up. Both are running (handshake) before.
    """
    parent = CancellationToken()  # under neither root: shutdown must leave it alone
    reader, writer = pipe()
    patient = Supervisor(start_method=start_method, grace_period=DEADLINE)
    coop = patient.spawn(tasks.wait_for_cancel, "coop", args=(writer,), parent_token=parent)
    strict = Supervisor(start_method=start_method, grace_period=0.1)
    stubborn = strict.spawn(tasks.ignore_cancel, "stubborn", args=(writer,), parent_token=parent)
    writer.close()
    for _ in range(2):
        assert reader.poll(DEADLINE)
        reader.recv()
    patient.shutdown()
    assert coop.join(0) == "cancelled"  # shutdown returned once it had finished, not killed
    assert not stubborn.is_finished()
    strict.shutdown()
    for sup in (patient, strict):
        assert sup.token.cause == "Supervisor shut down"
    assert stubborn.is_cancelled()  # its own token, cancelled by shutdown, ignored
    with pytest.raises(TaskCrashedError, match="stopped on request") as info:
        stubborn.join(0)
    assert info.value.stopped
    assert "did not honour cancellation within 0.1 s of shutdown" in str(info.value)
    assert not parent.is_cancelled()
    strict.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        strict.spawn(tasks.return_value, "late", args=(1,))


def _wait_gone(name: str) -> bool:
    """Wait (bounded) until no thread is called ``name``."""
    for thread in [t for t in threading.enumerate() if t.name == name]:
        thread.join(DEADLINE)
    return not any(t.name == name for t in threading.enumerate())


def test_shutdown_from_an_event_callback(start_method: str, pipe: Pipe) -> None:
    """Test that shutdown() in an on_event callback returns at once and still ends every task."""
    sup = Supervisor(start_method=start_method, grace_period=DEADLINE)
    reader, writer = pipe()
    stubborn = sup.spawn(tasks.ignore_cancel, "stubborn", args=(writer,))
    writer.close()
    assert reader.poll(DEADLINE)  # running
    seen: list[object] = []
    returned = threading.Event()

    def shut_down_on_failure(event: TaskEvent) -> None:
        if event.kind == "failed":
            seen.append(threading.current_thread().name)
            try:
                sup.shutdown(timeout=0)  # stubborn: SIGTERM at once, from the thread's timers
                seen.append("returned")
            except BaseException as exc:  # the callback's errors are only logged
                seen.append(exc)
            returned.set()

    sup.on_event(shut_down_on_failure)
    failing = sup.spawn(tasks.fail, "fails", parent_token=CancellationToken())
    try:
        assert returned.wait(DEADLINE)
        assert seen == ["procsup-supervisor", "returned"]
        with pytest.raises(TaskFailedError):
            failing.join(DEADLINE)
        with pytest.raises(TaskCrashedError, match="stopped on request") as info:
            stubborn.join(DEADLINE)
        assert info.value.stopped
        assert sup.token.cause == "Supervisor shut down"
        with pytest.raises(RuntimeError, match="shut down"):
            sup.spawn(tasks.return_value, "late", args=(1,))
        # The shutdown ends on its own: the supervision thread and the one that waited for it.
        assert _wait_gone("procsup-shutdown")
        assert _wait_gone("procsup-supervisor")
    finally:
        if returned.is_set():  # else the supervision thread is stuck: no shutdown could end
            sup.shutdown(timeout=0)  # idempotent


def test_stop_and_join_from_an_event_callback(start_method: str, pipe: Pipe) -> None:
    """Test that stop() in an on_event callback returns at once, and join() cannot hang there."""
    sup = Supervisor(start_method=start_method, grace_period=DEADLINE)
    reader, writer = pipe()
    stubborn = sup.spawn(tasks.ignore_cancel, "stubborn", args=(writer,))
    writer.close()
    assert reader.poll(DEADLINE)
    seen: list[object] = []
    returned = threading.Event()

    def stop_on_failure(event: TaskEvent) -> None:
        if event.kind != "failed":
            return
        calls: tuple[Callable[[], object], ...] = (
            lambda: stubborn.stop(timeout=0),  # SIGTERM once the callback has returned
            lambda: stubborn.join(DEADLINE),  # unfinished: it could never return here
            lambda: failing.join(DEADLINE),  # published before the event: it raises that
        )
        for call in calls:
            try:
                seen.append(call())
            except BaseException as exc:  # the callback's errors are only logged
                seen.append(exc)
        returned.set()

    ready, told = pipe()
    failing = sup.spawn(
        tasks.fail_after_ready, "fails", args=(told,), parent_token=CancellationToken()
    )
    told.close()
    sup.on_event(stop_on_failure)
    try:
        assert ready.poll(DEADLINE)
        failing.cancel()  # it fails now: the "failed" event
        assert returned.wait(DEADLINE)
        stopped, joined, failed = seen
        assert stopped is None
        assert isinstance(joined, RuntimeError)
        assert "supervision thread" in str(joined)
        assert isinstance(failed, TaskFailedError)
        with pytest.raises(TaskCrashedError, match="stopped on request") as info:
            stubborn.join(DEADLINE)
        assert info.value.stopped
        assert not sup.token.is_cancelled()  # a stop leaves the parent alone
    finally:
        if returned.is_set():  # else the supervision thread is stuck: no shutdown could end
            sup.shutdown(timeout=0)


def test_spawn_defaults_to_the_supervisor_token(runtime: Supervisor) -> None:
    """Test that spawn() without parent_token makes the task a child of the supervisor's root."""
    handle = runtime.spawn(tasks.fail, "root-child")
    with pytest.raises(TaskFailedError):
        handle.join(DEADLINE)
    assert runtime.token.is_cancelled()
    assert runtime.token.cause == str(handle._task.future.exception())


def _closure() -> Callable[[CancellationToken], None]:
    def inner(token: CancellationToken) -> None:
        pass

    return inner


BAD_INPUT: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "non-callable": ({"task_fn": 42}, TypeError, "task_fn must be callable"),
    "non-token parent": ({"parent_token": "root"}, TypeError, "parent_token must be"),
    "non-str description": ({"description": 7}, TypeError, "description must be a str"),
    "args not a tuple": ({"args": 3}, TypeError, "args must be a tuple"),
    "runtime not a Supervisor": ({"runtime": "sup"}, TypeError, "runtime must be a Supervisor"),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_raises_at_once(
    runtime: Supervisor, case: tuple[dict[str, Any], type[Exception], str]
) -> None:
    """Test that bad input raises a clear error and starts no process."""
    overrides, error, message = case
    call: dict[str, Any] = {
        "task_fn": tasks.return_value,
        "parent_token": CancellationToken(),
        "description": "bad",
        "args": (1,),
        "runtime": runtime,
        **overrides,
    }
    before = psutil.Process().children(recursive=True)
    with pytest.raises(error, match=message):
        CriticalTaskExecutionHandle(**call)
    assert not runtime._backend.booted  # no supervision thread either
    assert psutil.Process().children(recursive=True) == before


@pytest.mark.parametrize("fn", [lambda token: None, _closure()], ids=["lambda", "closure"])
def test_lambdas_and_closures_run(
    runtime: Supervisor, fn: Callable[[CancellationToken], None]
) -> None:
    """Test that lambdas and closures run under every start method (by value where they cannot
    be imported: procsup._process.reduction; tests/test_newcomer.py has the rest)."""
    assert runtime.spawn(fn, "inline").join(DEADLINE) is None


def test_unpicklable_args_start_nothing(runtime: Supervisor) -> None:
    """Test that args that cannot cross into the child raise from the constructor."""
    if runtime.start_method == "fork":
        pytest.skip("fork children inherit their args, nothing is pickled")
    with pytest.raises(TypeError, match=r"'bad-args' could not be started: args\[0\], .*pickled"):
        runtime.spawn(tasks.return_value, "bad-args", args=(threading.Lock(),))


@pytest.mark.parametrize(
    ("timeout", "error", "message"),
    [
        (-1, ValueError, "timeout must be >= 0"),
        (math.nan, ValueError, "timeout must be >= 0"),
        ("1", TypeError, "timeout must be a number"),
    ],
)
def test_join_timeout_validation(
    runtime: Supervisor, timeout: Any, error: type[Exception], message: str
) -> None:
    """Test that a bad join() timeout raises at once and cancels nothing."""
    parent = CancellationToken()
    handle = runtime.spawn(tasks.wait_for_cancel, "t", parent_token=parent)
    with pytest.raises(error, match=message):
        handle.join(timeout)
    assert not handle.is_cancelled()
    handle.cancel()
    assert handle.join(DEADLINE) == "cancelled"


def test_supervisor_argument_validation() -> None:
    """Test that Supervisor rejects an unknown start method, a bad token and grace period."""
    with pytest.raises(ValueError, match="start_method"):
        Supervisor(start_method="teleport")
    with pytest.raises(TypeError, match="token"):
        Supervisor(token="root")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace_period"):
        Supervisor(grace_period=-1)


def test_nested_critical_tasks(start_method: str) -> None:
    """Test that a task can supervise its own sub-task, whose failure propagates up as a chain."""
    parent = CancellationToken()
    with Supervisor(start_method=start_method) as sup:
        handle = sup.spawn(tasks.nested, "outer", args=(start_method,), parent_token=parent)
        with pytest.raises(TaskFailedError) as info:
            handle.join(DEADLINE)
    error = info.value
    assert str(error).startswith("Critical task 'outer' failed: TaskFailedError: Critical task")
    inner = error.__cause__
    assert isinstance(inner, TaskFailedError)
    assert inner.description == "inner"
    assert str(inner) == "Critical task 'inner' failed: RuntimeError: inner failure"
    assert isinstance(inner.__cause__, RuntimeError)
    assert parent.cause == str(error)


def test_tasks_ignore_sigint(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that Ctrl-C (SIGINT) does not kill a task: the supervisor decides, by cancelling."""
    parent = CancellationToken()
    reader, writer = pipe()
    handle = runtime.spawn(tasks.wait_for_cancel, "calm", args=(writer,), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    os.kill(handle.pid, signal.SIGINT)
    handle.cancel()
    assert handle.join(DEADLINE) == "cancelled"
    assert handle.exitcode == 0


def test_monitor_lost(runtime: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that if the supervision thread dies, join() raises 'Critical task monitor was
    cancelled' instead of hanging."""

    def explode(self: Monitor, task: TaskRecord) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(Monitor, "_finish", explode)
    handle = runtime.spawn(tasks.return_value, "orphan", args=(1,))
    with pytest.raises(CriticalTaskError, match=r"^Critical task monitor was cancelled$"):
        handle.join(DEADLINE)
    assert runtime.closed
    task = handle._task
    assert isinstance(task, TaskRecord)
    task.proc.join(DEADLINE)  # nobody reaps for a dead monitor: clean up by hand
    task.release()


def test_a_task_sees_the_directory_argv_and_environment_of_its_start(
    runtime: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a task runs in its supervisor's working directory and sees its ``sys.argv``
    and environment as they are when it starts, not as they were when the zygote started
    (forkserver), under every start method: a variable set before ``spawn()`` is there, one
    deleted is gone, for ``os.environ`` and the C library alike."""
    assert runtime.spawn(tasks.surroundings, "before").join(DEADLINE) == (os.getcwd(), sys.argv)
    monkeypatch.setenv("PROCSUP_TEST_GONE", "here")
    names = ("PROCSUP_TEST_DEVICES", "PROCSUP_TEST_GONE")
    assert runtime.spawn(tasks.environment, "env", args=names).join(DEADLINE) == [None, "here"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["service.py", "--config", "prod.toml"])
    monkeypatch.setenv("PROCSUP_TEST_DEVICES", "1")
    monkeypatch.delenv("PROCSUP_TEST_GONE")
    seen = runtime.spawn(tasks.surroundings, "after").join(DEADLINE)
    assert seen == (str(tmp_path), ["service.py", "--config", "prod.toml"])
    assert runtime.spawn(tasks.environment, "env", args=names).join(DEADLINE) == ["1", None]


@pytest.mark.parametrize(("how", "exitcode"), [("return", 0), ("raise", 1), ("0", 0), ("3", 3)])
def test_a_process_a_task_forked_that_comes_back_exits(
    runtime: Supervisor, how: str, exitcode: int
) -> None:
    """Test that a process a task forked and did not end with os._exit (it returned, raised or
    called sys.exit()) exits as a script would, instead of reporting its outcome as the task's."""
    handle = runtime.spawn(newcomer_tasks.apply, "forker", args=(executor_items.fork_then, how))
    assert handle.join(DEADLINE) == ("parent", exitcode)
