"""Logging forwarded from tasks, captured output, and per-task limits, under every start method."""

from __future__ import annotations

import logging
from collections.abc import Callable
from multiprocessing.connection import Connection

import pytest

from procsup import CancellationToken, Supervisor, TaskCrashedError, TaskFailedError
from tests import daemon_tasks, tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


def test_task_log_records_reach_the_supervisor(
    runtime: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that records a task logs reach our handlers with its description and pid, formatted,
    exception text included, at the supervisor's levels."""
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="tests.daemon")
    logging.getLogger("tests.daemon.quiet").setLevel(logging.WARNING)
    try:
        h = runtime.spawn(daemon_tasks.log_some, "logger task")
        pid = h.join(DEADLINE)
    finally:
        logging.getLogger("tests.daemon.quiet").setLevel(logging.NOTSET)
    records = [r for r in caplog.records if r.name.startswith("tests.daemon")]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("DEBUG", "debug from the task"),
        ("INFO", "info from the task"),
        ("WARNING", "warning 42 from the task"),
        ("ERROR", "exception from the task"),
    ]
    for record in records:
        assert record.task_description == "logger task"  # type: ignore[attr-defined]
        assert record.task_pid == pid == h.pid  # type: ignore[attr-defined]
        assert record.process == pid
        assert record.processName == "logger task"
    assert records[2].shard == 7  # type: ignore[attr-defined]
    assert "ValueError: logged failure" in (records[3].exc_text or "")
    assert "Traceback" in caplog.text


def test_last_words_before_a_crash_are_delivered(
    runtime: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that a record logged just before SIGKILL is handled before join() raises."""
    caplog.set_level(logging.ERROR)
    h = runtime.spawn(daemon_tasks.log_then_crash, "doomed", parent_token=CancellationToken())
    with pytest.raises(TaskCrashedError):
        h.join(DEADLINE)
    assert [r.getMessage() for r in caplog.records if r.name == "tests.daemon"] == ["last words"]


def test_capture_output_prefixes_lines(
    runtime: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    """Test that capture_output shows stdout and stderr as prefixed lines, the last one too."""
    h = runtime.spawn(daemon_tasks.print_some, "printer", capture_output=True)
    h.join(DEADLINE)
    out, err = capsys.readouterr()
    prefix = f"[printer {h.pid}] "
    assert f"{prefix}to stdout 1\n{prefix}no newline at the end\n" in out
    assert f"{prefix}to stderr 1\n" in err


def test_captured_stderr_still_feeds_the_crash_record(
    runtime: Supervisor, capsys: pytest.CaptureFixture[str]
) -> None:
    """Test that with capture_output a crash record keeps the stderr tail and faulthandler dump."""
    h = runtime.spawn(daemon_tasks.complain_then_segfault, "loud", capture_output=True)
    with pytest.raises(TaskCrashedError) as info:
        h.join(DEADLINE)
    assert "about to touch address 0" in (info.value.stderr_tail or "")
    assert "complain_then_segfault" in (info.value.faulthandler_dump or "")
    _, err = capsys.readouterr()
    assert f"[loud {h.pid}] about to touch address 0\n" in err


def test_memory_limit(runtime: Supervisor) -> None:
    """Test that going over memory_limit fails the task with "memory limit exceeded"."""
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.allocate,
        "hungry",
        args=(2**30,),
        parent_token=parent,
        memory_limit=256 * 2**20,
    )
    with pytest.raises(TaskFailedError, match="memory limit exceeded") as info:
        h.join(DEADLINE)
    assert "MemoryError: memory limit exceeded (memory_limit=256.0 MiB" in str(info.value)
    assert parent.is_cancelled()


def test_memory_limit_leaves_room_below_it(runtime: Supervisor) -> None:
    """Test that a task within its memory_limit runs normally."""
    h = runtime.spawn(daemon_tasks.allocate, "modest", args=(2**20,), memory_limit=512 * 2**20)
    assert h.join(DEADLINE) == 2**20


def test_cpu_time_limit(runtime: Supervisor) -> None:
    """Test that a task spinning past cpu_time_limit is killed by SIGXCPU and says why."""
    parent = CancellationToken()
    h = runtime.spawn(daemon_tasks.spin, "spinner", parent_token=parent, cpu_time_limit=0.5)
    with pytest.raises(TaskCrashedError, match="CPU time limit exceeded") as info:
        h.join(DEADLINE)
    assert info.value.signal == "SIGXCPU"
    assert parent.is_cancelled()


def test_timeout_cancels_a_cooperative_task(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that at its timeout a task's token is cancelled; returning then is a return."""
    reader, writer = pipe()
    parent = CancellationToken()
    h = runtime.spawn(
        daemon_tasks.sleep_cooperatively,
        "sleepy",
        args=(writer,),
        parent_token=parent,
        timeout=0.2,
    )
    assert reader.poll(DEADLINE)
    assert h.join(DEADLINE) == "cancelled"
    assert not parent.is_cancelled()


def test_timeout_then_grace_then_stop(start_method: str, pipe: Pipe) -> None:
    """Test that a task ignoring its timeout's cancellation is killed after the grace period, and
    that this crash cancels the parent."""
    _reader, writer = pipe()
    parent = CancellationToken()
    with Supervisor(start_method=start_method, grace_period=0.2) as sup:
        h = sup.spawn(
            tasks.ignore_cancel,
            "stuck",
            args=(writer,),
            parent_token=parent,
            timeout=0.2,
        )
        # No handshake first: under load a spawn child may still be starting when the 0.4 s are
        # up, and it is then killed before it says it runs, which this test accepts as well.
        with pytest.raises(TaskCrashedError) as info:
            h.join(DEADLINE)
    message = str(info.value)
    assert "it exceeded its timeout of 0.2 s" in message
    assert "then killed by SIGTERM" in message
    assert not info.value.stopped
    assert parent.is_cancelled()
