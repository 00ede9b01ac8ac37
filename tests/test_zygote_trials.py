"""The zygote and the top level of task modules: crashes and stalls there are their tasks' alone.

Under the default start method the zygote forks every task; it imports a task's module itself
only once a trial child has imported it cleanly and fast (``procsup._process.trials``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    Supervisor,
    TaskCrashedError,
)
from procsup._process.zygote import _Zygote
from tests import tasks, zygote_import_gate, zygote_import_marker, zygote_import_segfault
from tests.conftest import process_gone

DEADLINE = 10.0


def _zygote_pid() -> int:
    """The pid of this process's zygote, the one every Supervisor here starts tasks with."""
    zygote = _Zygote.get()
    assert zygote._process.poll() is None, "the zygote exited"
    return zygote._process.pid


def _running(
    sup: Supervisor, description: str, parent: CancellationToken
) -> CriticalTaskExecutionHandle[str]:
    """A task that waits for its cancellation, once it says it is running (a handshake)."""
    reader, writer = mp.Pipe(duplex=False)
    handle = sup.spawn(tasks.wait_for_cancel, description, args=(writer,), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    assert reader.recv() == "ready"
    reader.close()
    return handle


def test_a_task_module_whose_top_level_segfaults_crashes_its_own_task_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that a task whose module segfaults on import fails with SIGSEGV, at every start, while
    the zygote (the same process) and an unrelated running task carry on untouched."""
    with Supervisor(grace_period=2.0) as sup:
        parent = CancellationToken()
        assert sup.spawn(tasks.return_value, "the zygote is up", args=(0,)).join(DEADLINE) == 0
        zygote = _zygote_pid()
        running = _running(sup, "bystander", parent)
        monkeypatch.setenv(zygote_import_segfault.CRASH, "1")
        for _ in range(2):
            own_parent = CancellationToken()
            handle = sup.spawn(
                zygote_import_segfault.never, "segfaults on import", parent_token=own_parent
            )
            with pytest.raises(TaskCrashedError) as info:
                handle.join(DEADLINE)
            assert info.value.signal == "SIGSEGV"
            assert own_parent.is_cancelled()
        assert not running.is_finished()
        assert not parent.is_cancelled()
        assert _zygote_pid() == zygote
        running.cancel()
        assert running.join(DEADLINE) == "cancelled"
        assert not parent.is_cancelled()


def _arrivals(fd: int, count: int) -> list[int]:
    """The pids of the first ``count`` processes that reported at the gate (``fd``: its FIFO)."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only these reached the gate: {data!r}"
        if select.select([fd], [], [], left)[0]:
            data += os.read(fd, 4096)
    return [int(pid) for pid in data.split()[:count]]


def test_a_task_module_whose_top_level_blocks_holds_up_no_other_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that while a task's module blocks in its top level, another task's SIGKILL is still
    seen (its parent cancelled) and an unrelated task still starts and ends: both before the
    module's gate opens; and that the zygote's trial of that module is killed meanwhile."""
    gate_path, arrived_path = tmp_path / "gate", tmp_path / "arrived"
    os.mkfifo(gate_path)
    os.mkfifo(arrived_path)
    # The gate's only writer: its readers read EOF once this is closed. (O_RDWR: never blocks.)
    gate = os.open(gate_path, os.O_RDWR | os.O_CLOEXEC)
    arrived = os.open(arrived_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with Supervisor(grace_period=2.0) as sup:
            parent = CancellationToken()
            victim = _running(sup, "victim", parent)
            monkeypatch.setenv(zygote_import_gate.GATE, str(gate_path))
            monkeypatch.setenv(zygote_import_gate.ARRIVED, str(arrived_path))
            started: list[CriticalTaskExecutionHandle[int]] = []
            starter = threading.Thread(
                target=lambda: started.append(
                    sup.spawn(zygote_import_gate.value, "blocks on import", args=(1,))
                )
            )
            starter.start()
            try:
                starter.join(DEADLINE)
                assert not starter.is_alive(), "spawn() waited for the module's import"
                (blocked,) = started
                # The task and one more process wait at the gate: the zygote's trial.
                arrivals = _arrivals(arrived, 2)
                assert blocked.pid in arrivals
                (trial,) = [pid for pid in arrivals if pid != blocked.pid]
                assert psutil.Process(trial).ppid() == _zygote_pid()
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                assert parent.wait(DEADLINE), "a task's death went unseen while the gate was shut"
                with pytest.raises(TaskCrashedError, match="SIGKILL"):
                    victim.join(DEADLINE)
                unrelated = sup.spawn(tasks.return_value, "unrelated", args=(7,))
                assert unrelated.join(DEADLINE) == 7
                assert not blocked.is_finished()  # the gate is still shut
                # The zygote gives up on an import that does not end: its trial is killed (and
                # the module is never imported there: the gate stays shut for it).
                assert process_gone(trial, DEADLINE)
            finally:
                os.close(gate)
                gate = -1
                starter.join(DEADLINE)
            assert blocked.join(DEADLINE) == 1
    finally:
        if gate >= 0:
            os.close(gate)
        os.close(arrived)


def test_a_task_module_is_imported_by_the_zygote_once_a_trial_imported_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that the first task of a module new to the zygote imports it itself, that a trial
    child imports it next, then the zygote (once), and later tasks are forked with it imported."""
    log = tmp_path / "imports"
    monkeypatch.setenv(zygote_import_marker.LOG, str(log))
    results: list[tuple[int, int]] = []
    with Supervisor() as sup:
        zygote = _zygote_pid()
        deadline = time.monotonic() + DEADLINE
        # Every start is a full round trip: no sleep between them, and at most a few are needed.
        while not results or results[-1][0] != zygote:
            assert time.monotonic() < deadline, f"the zygote never imported it: {results}"
            results.append(sup.spawn(zygote_import_marker.where, "where").join(DEADLINE))
        for importer, task in results[:-1]:
            assert importer == task  # each imported it itself
        assert results[-1][1] != zygote
        assert sup.spawn(zygote_import_marker.where, "again").join(DEADLINE)[0] == zygote
    lines = [int(pid) for pid in log.read_text().split()]
    others = [pid for pid in lines if pid not in {task for _, task in results}]
    # The trial (a busy machine may have it tried again) ran it before the zygote, once.
    assert others.count(zygote) == 1
    assert others[-1] == zygote
    assert len(others) >= 2
