"""The fork start method's shim (``procsup._shim``): the task's parent and a subreaper, blind to
signals, holding no fd of the supervisor's, reaped by the supervision thread, killed at shutdown."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import psutil
import pytest

from procsup import CriticalTaskExecutionHandle, Supervisor
from tests import contain_tasks
from tests.conftest import process_gone
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


pytestmark = pytest.mark.parametrize("start_method", ["fork"])  # ``pipe`` takes it


def _start(
    sup: Supervisor, pipe: Pipe
) -> tuple[CriticalTaskExecutionHandle[Any], int, list[int], Connection]:
    """A fork task that left a setsid() descendant and waits for a word on the returned pipe."""
    reader, writer = pipe()
    go_reader, go = pipe()
    handle = sup.spawn(contain_tasks.orphan_then_wait, "orphans", args=(writer, go_reader))
    writer.close()
    go_reader.close()
    assert reader.poll(DEADLINE)
    pid, descendants = reader.recv()
    return handle, pid, descendants, go


def test_the_task_is_the_shims_child_and_the_shim_holds_no_fd_of_ours(
    start_method: str, pipe: Pipe
) -> None:
    """Test that handle.pid is the task's own pid, that its parent is a shim whose parent is us,
    and that the shim keeps only /dev/null on fds 0-2 and its status pipe: nothing of ours (a
    pipe read to EOF) waits on it."""
    with Supervisor(start_method="fork", grace_period=0.1) as sup:
        handle, pid, descendants, go = _start(sup, pipe)
        assert handle.pid == pid
        shim = psutil.Process(pid).parent()
        assert shim is not None
        assert shim.pid != os.getpid()
        assert shim.ppid() == os.getpid()
        fds = {
            int(fd): os.readlink(f"/proc/{shim.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{shim.pid}/fd")
        }
        assert {fds[0], fds[1], fds[2]} == {os.devnull}
        (status,) = [target for fd, target in fds.items() if fd > 2]
        assert status.startswith("pipe:")
        go.send("go")
        assert handle.join(DEADLINE) is None
        assert all(process_gone(p, DEADLINE) for p in descendants)
        assert process_gone(shim.pid, DEADLINE)


def test_signals_to_the_shim_change_nothing(start_method: str, pipe: Pipe) -> None:
    """Test that Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 reaching the shim (it is in our process
    group) neither kill it nor free the task's orphans, which still die after the grace."""
    with Supervisor(start_method="fork", grace_period=0.1) as sup:
        handle, pid, descendants, go = _start(sup, pipe)
        shim = psutil.Process(pid).ppid()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            os.kill(shim, signum)
        go.send("go")
        assert handle.join(DEADLINE) is None
        assert all(process_gone(p, DEADLINE) for p in descendants)
        assert process_gone(shim, DEADLINE)


def test_shutdown_kills_a_returned_tasks_orphans_without_waiting_for_the_grace(
    start_method: str, pipe: Pipe
) -> None:
    """Test that shutdown() kills the orphans a fork task left, though their grace period (60 s)
    has not ended, and reaps the shim."""
    sup = Supervisor(start_method="fork", grace_period=60.0)
    try:
        handle, pid, descendants, go = _start(sup, pipe)
        shim = psutil.Process(pid).ppid()
        go.send("go")
        assert handle.join(DEADLINE) is None
        assert not process_gone(descendants[0], 0)  # within the grace period
    finally:
        sup.shutdown()
    assert all(process_gone(p, DEADLINE) for p in descendants)
    assert process_gone(shim, 0)
    assert shim not in {p.pid for p in psutil.Process().children()}  # reaped, not a zombie


def test_a_task_started_by_a_thread_that_ends_lives_on(start_method: str, pipe: Pipe) -> None:
    """Test that a fork task started from a short-lived thread outlives that thread (no death
    signal follows the thread) and its orphans are still contained."""
    sup = Supervisor(start_method="fork", grace_period=0.1)
    started: list[tuple[CriticalTaskExecutionHandle[Any], int, list[int], Connection]] = []
    thread = threading.Thread(target=lambda: started.append(_start(sup, pipe)))
    thread.start()
    thread.join(DEADLINE)
    try:
        assert not thread.is_alive()
        ((handle, pid, descendants, go),) = started
        assert not process_gone(pid, 0)
        go.send("go")
        assert handle.join(DEADLINE) is None
        assert all(process_gone(p, DEADLINE) for p in descendants)
    finally:
        sup.shutdown()
