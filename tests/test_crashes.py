"""The crash matrix: every way a task can end, under every start method, as one table.

Each row asserts what ``join()`` does, whether the parent token is cancelled, and its cause.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest

from procsup import (
    CancellationToken,
    CriticalTaskError,
    RemoteTraceback,
    Supervisor,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from tests import tasks
from tests.tasks import DEADLINE, HUGE

Pipe = Callable[[], tuple[Connection, Connection]]


@dataclass(frozen=True)
class Case:
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    error: type[CriticalTaskError] | None = None  # None: join() returns
    message: str = ""  # regex: what str(error) and the parent's cause say after "Critical task 'x'"
    exitcode: int | None = 0
    signal: str | None = None


D = "Critical task 'x'"
HUGE_SHA = hashlib.sha256(bytes(range(256)) * (HUGE // 256)).hexdigest()

CASES = {
    "SIGKILL": Case(
        tasks.sigkill,
        error=TaskCrashedError,
        message=r"crashed: killed by SIGKILL \(signal 9\) at [\d.]+ MiB peak RSS: out of memory or "
        "killed externally",
        exitcode=-9,
        signal="SIGKILL",
    ),
    "SIGSEGV": Case(
        tasks.segfault,
        error=TaskCrashedError,
        message=r"crashed: killed by SIGSEGV \(signal 11\): invalid memory access",
        exitcode=-11,
        signal="SIGSEGV",
    ),
    "SIGABRT": Case(
        tasks.abort,
        error=TaskCrashedError,
        message=r"crashed: killed by SIGABRT \(signal 6\): aborted",
        exitcode=-6,
        signal="SIGABRT",
    ),
    "os._exit(0)": Case(
        tasks.hard_exit,
        (0,),
        error=TaskCrashedError,
        message=r"crashed: exited with code 0 before reporting a result",
    ),
    "os._exit(3)": Case(
        tasks.hard_exit,
        (3,),
        error=TaskCrashedError,
        message="crashed: exited with code 3 without reporting a result",
        exitcode=3,
    ),
    "SystemExit(0)": Case(tasks.system_exit, (0,)),
    "SystemExit(None)": Case(tasks.system_exit, (None,)),
    "SystemExit(3)": Case(
        tasks.system_exit, (3,), error=TaskPanickedError, message=r"panicked: SystemExit: 3"
    ),
    "KeyboardInterrupt": Case(
        tasks.keyboard_interrupt, error=TaskPanickedError, message="panicked: KeyboardInterrupt"
    ),
    "exception": Case(
        tasks.fail_chained, error=TaskFailedError, message="failed: ValueError: lookup failed"
    ),
    "unpicklable exception": Case(
        tasks.unpicklable_error,
        error=TaskFailedError,
        message="failed: UnpicklableError: cannot cross",
    ),
    "unpicklable return": Case(
        tasks.unpicklable_return,
        error=TaskFailedError,
        message=r"failed: PicklingError: the task's return value \(Unpicklable\) cannot be sent",
    ),
    "huge return": Case(tasks.huge_return),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_crash_matrix(runtime: Supervisor, case: Case) -> None:
    """Test join()'s outcome, the parent's state and the parent's cause for each way to end."""
    parent = CancellationToken()
    handle = runtime.spawn(case.fn, "x", args=case.args, parent_token=parent)
    if case.error is None:
        value = handle.join(DEADLINE)
        if case.fn is tasks.huge_return:
            assert len(value) == HUGE
            assert hashlib.sha256(value).hexdigest() == HUGE_SHA
        else:
            assert value is None
        assert not parent.is_cancelled()
        assert parent.cause is None
    else:
        with pytest.raises(case.error) as info:
            handle.join(DEADLINE)
        error = info.value
        assert re.match(f"{D} {case.message}", str(error)), str(error)
        assert parent.is_cancelled()  # before join() could raise
        assert parent.cause == str(error)
        assert error.description == "x"
        assert error.pid == handle.pid
        assert error.exitcode == handle.exitcode
        if isinstance(error, TaskCrashedError):
            assert error.signal == case.signal
            assert not error.stopped
            assert f"(pid {handle.pid})" in str(error)
        # Every outcome survives pickling, as it must to cross into a grandparent.
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error)
        assert str(clone) == str(error)
    assert handle.exitcode == case.exitcode


def test_exception_keeps_child_traceback_and_chain(runtime: Supervisor) -> None:
    """Test that the cause is the original exception with its child-side traceback and chain."""
    handle = runtime.spawn(tasks.fail_chained, "x", parent_token=CancellationToken())
    with pytest.raises(TaskFailedError) as info:
        handle.join(DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert cause.__traceback__ is not None
    frames = [f.tb_frame.f_code.co_name for f in _walk(cause.__traceback__)]
    assert "fail_chained" in frames
    assert isinstance(cause.__cause__, KeyError)
    text = info.value.remote_traceback or ""
    assert "fail_chained" in text
    assert "KeyError: 'missing'" in text


def _walk(tb: Any) -> list[Any]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def test_unpicklable_outcomes_carry_the_child_traceback(runtime: Supervisor) -> None:
    """Test that unpicklable exceptions and returns arrive as text tracebacks, never hangs."""
    handle = runtime.spawn(tasks.unpicklable_error, "x", parent_token=CancellationToken())
    with pytest.raises(TaskFailedError) as info:
        handle.join(DEADLINE)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.type_name == "tests.tasks.UnpicklableError"
    assert "in unpicklable_error" in cause.text
    assert "cannot cross" in str(cause)
    returns = runtime.spawn(tasks.unpicklable_return, "y", parent_token=CancellationToken())
    with pytest.raises(TaskFailedError) as info:
        returns.join(DEADLINE)
    assert isinstance(info.value.__cause__, pickle.PicklingError)
    assert "cannot pickle '_thread.lock' object" in (info.value.remote_traceback or "")


def test_grandchild_holding_every_fd_does_not_delay_crash_detection(
    runtime: Supervisor, pipe: Pipe
) -> None:
    """Test that death is seen from the process itself, not pipe EOF: a grandchild holding the
    result pipe (and every other fd) cannot hide the task's segfault.

    An order of events, not a latency: the grandchild keeps every fd open until it sees the tree
    cancelled (or its own deadline passes). A supervisor that waited for EOF would cancel the
    tree only after the grandchild had given up, and the grandchild would say "timed out".
    """
    parent = CancellationToken()
    reader, writer = pipe()
    handle = runtime.spawn(tasks.grandchild_then_segfault, "x", args=(writer,), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    reader.recv()  # the grandchild is forked, holding every fd: the task crashes next
    assert parent.wait(DEADLINE)
    with pytest.raises(TaskCrashedError, match="SIGSEGV"):
        handle.join(DEADLINE)
    # The grandchild (reparented to init, so not ours to reap) saw the tree cancelled and exits.
    assert reader.poll(DEADLINE)
    assert reader.recv() == "cancelled"
