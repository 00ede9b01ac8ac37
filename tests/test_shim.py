"""The fork start method's shim (``procsup._process.shim``): the task's parent and a subreaper,
blind to signals, holding no fd of the supervisor's, reaped by the supervision thread, killed at
shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import CancellationToken, CriticalTaskExecutionHandle, Supervisor
from procsup._process import zygote as _zygote
from procsup._process.zygote import ForkProcess
from tests import contain_tasks, process_tasks, tasks
from tests.conftest import process_gone
from tests.tasks import DEADLINE

ROOT = Path(__file__).resolve().parent.parent

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


def test_a_thread_an_at_fork_hook_starts_in_the_shim_cannot_take_its_sigchld(
    start_method: str,
) -> None:
    """Test that when a user's at-fork hook starts a thread (it runs in the shim too), every
    thread of the shim has SIGCHLD blocked, results come back and shims exit. Run in a separate
    process: a hook cannot be unregistered."""
    script = subprocess.run(
        [sys.executable, "-m", "tests.atfork_script", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert script.returncode == 0, script.stdout + script.stderr
    assert script.stdout.strip() == "ok"


def test_concurrent_fork_starts_keep_their_status_pipes_to_themselves(start_method: str) -> None:
    """Test that fork tasks started from several threads at once never inherit the write end of
    another task's status pipe: one would hold it open, and a shim killed without reporting
    would then never be seen to end."""
    token = CancellationToken()
    procs: list[ForkProcess] = []
    lock = threading.Lock()

    def start() -> None:
        for _ in range(10):
            proc = ForkProcess(process_tasks.wait_for, (token,))
            proc.start()
            with lock:
                procs.append(proc)

    threads = [threading.Thread(target=start) for _ in range(5)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between any two bytecodes
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
    finally:
        sys.setswitchinterval(switching)
    try:
        assert len(procs) == 50
        pipes = {f"pipe:[{os.fstat(proc.sentinel).st_ino}]": proc.pid for proc in procs}
        for proc in procs:
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):  # closed meanwhile (the task's own end)
                    target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                    with open(f"/proc/{proc.pid}/fdinfo/{fd}") as f:
                        (flags,) = [int(ln.split()[1], 8) for ln in f if ln.startswith("flags:")]
                    owner = pipes.get(target)
                    writes = flags & os.O_ACCMODE == os.O_WRONLY
                    assert not (writes and owner not in (None, proc.pid)), (proc.pid, owner)
    finally:
        token.cancel("done")
        for proc in procs:
            proc.join(DEADLINE)
            assert proc.exitcode == 0
            proc.close()


def test_ctrl_c_while_a_fork_task_starts_leaves_nothing_behind(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that KeyboardInterrupt raised while start() waits for the shim's report kills the
    shim and the task and closes every fd (the autouse leak check sees any left)."""

    def interrupted(fd: int, size: int) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(_zygote, "read_exactly", interrupted)
    with Supervisor(start_method="fork") as sup, pytest.raises(KeyboardInterrupt):
        sup.spawn(tasks.return_value, "interrupted", args=(1,))


def test_a_shim_the_kernel_reaped_is_not_waited_for(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that with SIGCHLD ignored, a shim already reaped by the kernel when start() looks for
    it (its pidfd cannot be had) costs nothing: the result comes back, nothing is signalled."""

    def reaped(pid: int) -> None:
        raise ProcessLookupError(pid)

    monkeypatch.setattr(_zygote, "Shim", reaped)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        with Supervisor(start_method="fork") as sup:
            assert sup.spawn(tasks.return_value, "fast", args=(7,)).join(DEADLINE) == 7
    finally:
        signal.signal(signal.SIGCHLD, previous)
