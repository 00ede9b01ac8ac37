"""The crash record of TaskCrashedError: exit facts, resource use, stderr tail, faulthandler dump;
and the token slots a crashed task leaves behind are given back."""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import sys

import pytest

from procsup import CancellationToken, Supervisor, TaskCrashedError
from procsup._os.tree import ExitInfo
from procsup._outcome import crash as _crash
from procsup._token.arena import _FIRST_SLOT, _H_FREE, _H_HIGH, _NEXT, SLOT_WORDS, Arena
from tests import contain_tasks
from tests.tasks import DEADLINE


def test_segfault_record_has_stderr_tail_and_faulthandler_dump(
    runtime: Supervisor, capfd: pytest.CaptureFixture[str]
) -> None:
    """Test that a native crash's error names where it crashed, carries the last 50 stderr lines,
    the faulthandler dump and the resource use, and that stderr still reaches our stderr."""
    handle = runtime.spawn(contain_tasks.loud_segfault, "loud", args=(80,))
    with pytest.raises(TaskCrashedError) as info:
        handle.join(DEADLINE)
    error = info.value
    message = str(error)
    assert message.startswith(
        "Critical task 'loud' crashed: killed by SIGSEGV (signal 11) in loud_segfault() at "
        "tests/contain_tasks.py:"
    ), message
    assert error.signal == "SIGSEGV"
    assert error.exitcode == -11
    assert error.core_dumped is False  # RLIMIT_CORE is 0 in the task
    assert error.peak_rss is not None
    assert error.peak_rss > 1 << 20
    assert error.cpu_time is not None
    assert error.cpu_time >= 0
    assert error.wall_time is not None
    assert error.wall_time > 0
    dump = error.faulthandler_dump or ""
    assert dump.startswith("Fatal Python error: Segmentation fault")
    assert "in loud_segfault" in dump
    tail = error.stderr_tail or ""
    assert len(tail.splitlines()) <= 50
    assert "stderr line 79" in tail
    assert "stderr line 0\n" not in tail
    notes = "\n".join(getattr(error, "__notes__", []))
    assert f"crash record: pid {handle.pid}, exit code -11, signal SIGSEGV" in notes
    assert "stderr line 79" in notes
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.stderr_tail, clone.peak_rss, clone.__notes__) == (
        error.stderr_tail,
        error.peak_rss,
        error.__notes__,
    )
    forwarded = capfd.readouterr().err
    assert "stderr line 0\n" in forwarded
    assert "Fatal Python error: Segmentation fault" in forwarded


def test_stderr_tail_is_bounded(runtime: Supervisor) -> None:
    """Test that the tail keeps at most 8 KiB and 50 lines, the last ones, written at fd level."""
    handle = runtime.spawn(contain_tasks.loud_exit, "chatty", args=(300, 200))
    with pytest.raises(TaskCrashedError, match="exited with code 3") as info:
        handle.join(DEADLINE)
    tail = info.value.stderr_tail or ""
    assert len(tail.encode()) <= 8 * 1024
    lines = tail.splitlines()
    assert 0 < len(lines) <= 50
    assert lines[-1].startswith("00299 x")
    assert all(len(line) == 206 for line in lines)  # whole lines only
    assert info.value.faulthandler_dump is None


def test_sigkill_message_leads_with_peak_rss(runtime: Supervisor) -> None:
    """Test that a SIGKILL names the peak RSS right after the signal."""
    handle = runtime.spawn(contain_tasks.sigkill_self, "killed")
    with pytest.raises(TaskCrashedError, match=r"SIGKILL \(signal 9\) at [\d.]+ MiB peak RSS"):
        handle.join(DEADLINE)


def test_oom_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a SIGKILL at half the memory available or more reads as the likely OOM killer."""
    monkeypatch.setattr(_crash, "_memory_available", lambda: 4 << 30)
    big = ExitInfo(-9, peak_rss=int(1.9 * (1 << 30)) + (1 << 30), cpu_time=1.0)
    small = ExitInfo(-9, peak_rss=30 << 20, cpu_time=1.0)
    assert _crash.describe(-9, big, None) == (
        "killed by SIGKILL (signal 9) at 2.9 GiB peak RSS: likely the out-of-memory killer",
        "SIGKILL",
    )
    assert _crash.describe(-9, small, None)[0] == (
        "killed by SIGKILL (signal 9) at 30.0 MiB peak RSS: out of memory or killed externally"
    )
    assert _crash.describe(-9, big, None, stopped=True)[0].endswith("killed externally")
    core = ExitInfo(-6, core_dumped=True)
    text, _ = _crash.describe(-6, core, None)
    assert text.startswith("killed by SIGABRT (signal 6, core dumped)")


def live_slots() -> int:
    """Token slots in use in this process's arena."""
    gc.collect()
    arena = Arena.default()
    arena.lock()
    try:
        words = arena.words
        free, slot = 0, words[_H_FREE]
        while slot:
            free += 1
            slot = words[slot * SLOT_WORDS + _NEXT]
        return int(words[_H_HIGH]) - _FIRST_SLOT - free
    finally:
        arena.unlock()


def test_crashed_task_gives_its_token_slots_back(runtime: Supervisor) -> None:
    """Test that the child tokens a crashed task held (and its own token) are freed once it is
    reaped and its handle dropped: a dead process cannot release them itself."""
    parent = CancellationToken()
    counts = []
    for _ in range(3):  # the first run may allocate what the supervisor keeps for good
        counts.append(live_slots())
        handle = runtime.spawn(
            contain_tasks.child_tokens_then_crash, "leaky", args=(20,), parent_token=parent
        )
        with pytest.raises(TaskCrashedError) as info:
            handle.join(DEADLINE)
        # The error's traceback holds join()'s frame, hence the handle; pytest's log capture
        # holds the error (it was logged) until the test ends.
        info.value.__traceback__ = None
        del handle, info
    counts.append(live_slots())
    assert counts[1] == counts[2] == counts[3], counts


def test_a_task_whose_module_fails_to_import_in_the_child_has_the_traceback_in_its_record(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that when a task's module cannot be imported in the task process (zygote and spawn
    children import it; fork children inherit it), the ImportError's traceback is in the crash
    record's stderr tail, not only on the zygote's terminal, and the parent is cancelled."""
    if start_method == "fork":
        pytest.skip("fork children inherit the module: nothing is imported")
    monkeypatch.setenv("PROCSUP_TEST_SUPERVISOR", str(os.getpid()))
    monkeypatch.delitem(sys.modules, "tests.supervisor_only_tasks", raising=False)
    supervisor_only_tasks = importlib.import_module("tests.supervisor_only_tasks")

    parent = CancellationToken()
    with Supervisor(start_method=start_method) as sup:
        handle = sup.spawn(supervisor_only_tasks.nothing, "unimportable", parent_token=parent)
        with pytest.raises(TaskCrashedError) as info:
            handle.join(DEADLINE)
    assert parent.is_cancelled()
    assert info.value.stderr_tail is not None
    assert "this module imports only in the supervisor process" in info.value.stderr_tail
