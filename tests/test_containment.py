"""Containment: process trees die with their task, tasks die with their supervisor, signals and
interpreter exit shut down cleanly, and stop/shutdown stay bounded. Real processes, real signals."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    Supervisor,
    TaskCrashedError,
)
from procsup._os import tree as _contain
from procsup._supervision import launch as _launch
from tests import contain_tasks, tasks
from tests.conftest import process_gone
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]
ROOT = Path(__file__).resolve().parent.parent


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.parametrize("how", ["stop", "shutdown"])
def test_stop_and_shutdown_kill_the_whole_tree_setsid_included(
    start_method: str, pipe: Pipe, how: str
) -> None:
    """Test that stop() and shutdown() kill Popen, forked and setsid() descendants of a task that
    ignores cancellation and SIGTERM, and leave its parent token alone."""
    parent = CancellationToken()
    reader, writer = pipe()
    sup = Supervisor(start_method=start_method, grace_period=0.1)
    handle = sup.spawn(contain_tasks.make_tree, "tree", args=(writer, "hang"), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    descendants = reader.recv()
    assert len(descendants) == 4
    if how == "shutdown":
        sup.shutdown()
    with pytest.raises(TaskCrashedError, match="stopped on request") as info:
        handle.stop(timeout=0)  # after shutdown(): returns like join()
    sup.shutdown()
    assert info.value.stopped
    assert info.value.signal == "SIGKILL"
    assert not parent.is_cancelled()
    assert all(process_gone(pid, DEADLINE) for pid in [handle.pid, *descendants])


@pytest.mark.parametrize(("then", "exitcode"), [("segfault", -signal.SIGSEGV), ("exit", 3)])
def test_crash_kills_descendants_after_the_grace_period(
    start_method: str, pipe: Pipe, then: str, exitcode: int
) -> None:
    """Test that every descendant of a crashed task, setsid() ones included, is killed after the
    grace period: they reparent to the task's parent, a subreaper (the zygote, or under fork the
    task's shim)."""
    reader, writer = pipe()
    sup = Supervisor(start_method=start_method, grace_period=0.2)
    parent = CancellationToken()
    handle = sup.spawn(contain_tasks.make_tree, "tree", args=(writer, then), parent_token=parent)
    writer.close()
    assert reader.poll(DEADLINE)
    popen, forked, session_leader, session_child = reader.recv()
    with pytest.raises(TaskCrashedError) as info:
        handle.join(DEADLINE)
    assert info.value.exitcode == exitcode
    assert parent.is_cancelled()
    descendants = [popen, forked, session_leader, session_child]
    try:
        assert all(process_gone(pid, DEADLINE) for pid in descendants)
    finally:
        _kill(descendants)
        sup.shutdown()


def test_descendants_of_a_task_that_returned_are_killed_after_the_grace_period(
    start_method: str, pipe: Pipe
) -> None:
    """Test that every descendant a task leaves behind when it returns, setsid() ones included,
    is killed after the grace period, under every start method."""
    reader, writer = pipe()
    sup = Supervisor(start_method=start_method, grace_period=0.2)
    handle = sup.spawn(contain_tasks.make_tree, "tree", args=(writer, "return"))
    writer.close()
    descendants: list[int] = []
    try:
        assert reader.poll(DEADLINE)
        descendants = reader.recv()
        assert handle.join(DEADLINE) is None
        assert len(descendants) == 4
        assert all(process_gone(pid, DEADLINE) for pid in descendants)
    finally:
        _kill(descendants)
        sup.shutdown()


@pytest.mark.parametrize(
    ("ending", "new_session"),
    [("returns", False), ("returns", True), ("stopped", True)],
    ids=["returns-same-group", "returns-setsid", "stopped-setsid"],
)
def test_a_descendant_that_keeps_forking_is_killed(
    start_method: str, pipe: Pipe, ending: str, new_session: bool
) -> None:
    """Test that a descendant that forks and exits every few ms (its pid never stays the same)
    is still killed: after the grace period once its task returned, and by stop() of a task that
    ignores SIGTERM when it left for its own session (the session is killed whole)."""
    reader, writer = pipe()
    sup = Supervisor(start_method=start_method, grace_period=0.2)
    hang = ending == "stopped"
    handle = sup.spawn(contain_tasks.leave_hopper, "hopper", args=(writer, new_session, hang))
    writer.close()
    group = 0
    try:
        assert reader.poll(DEADLINE)
        group = reader.recv()
        if hang:
            with pytest.raises(TaskCrashedError, match="stopped on request"):
                handle.stop(timeout=0)
        else:
            assert handle.join(DEADLINE) is None
        assert reader.poll(DEADLINE), "a generation of the hopper still holds the pipe"
        with pytest.raises(EOFError):  # every generation is gone
            reader.recv()
    finally:
        if group:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        sup.shutdown()


def test_a_strangers_group_a_descendant_joined_is_left_alone(start_method: str, pipe: Pipe) -> None:
    """Test that when a task's descendant joins a process group of strangers (whose leader is
    gone) and the task returns, the descendant is killed after the grace but the strangers are
    not: procsup kills whole only the sessions a task's tree started."""
    leader = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nif os.fork() == 0: time.sleep(30)"],
        process_group=0,
    )
    assert leader.wait(DEADLINE) == 0
    (stranger,) = [p for p in psutil.process_iter() if _pgid(p.pid) == leader.pid]
    reader, writer = pipe()
    sup = Supervisor(start_method=start_method, grace_period=0.1)
    try:
        handle = sup.spawn(contain_tasks.join_group_then_sleep, "joiner", args=(writer, leader.pid))
        writer.close()
        assert reader.poll(DEADLINE)
        joiner = reader.recv()
        assert handle.join(DEADLINE) is None
        assert process_gone(joiner, DEADLINE)  # killed with everything its killer killed
        assert not process_gone(stranger.pid, 0), "the strangers were killed"
    finally:
        stranger.kill()
        stranger.wait(DEADLINE)
        sup.shutdown()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def _script(scenario: str, method: str, grace: float, fd: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.supervisor_script", scenario, method, str(grace), str(fd)],
        pass_fds=(fd,),
        cwd=ROOT,
    )
    os.close(fd)  # the script and its tasks hold it now: EOF once they are all gone
    return proc


def _receive(reader: Connection, count: int) -> list[Any]:
    messages: list[Any] = []
    for _ in range(count):
        assert reader.poll(DEADLINE), f"no message after {messages}"
        messages.append(reader.recv())
    return messages


def test_supervisor_sigkill_cancels_tokens_then_kills_after_grace(
    start_method: str, report_pipe: tuple[Connection, int]
) -> None:
    """Test that SIGKILLing a supervisor process cancels each task's token at once, saying so, and
    kills what is left (tasks and their setsid() descendants) after the grace period."""
    reader, fd = report_pipe
    script = _script("die", start_method, 2.0, fd)
    try:
        ready = _receive(reader, 2)
        script.kill()
        assert script.wait(DEADLINE) == -signal.SIGKILL
        cancelled = _receive(reader, 2)
    finally:
        script.kill()
        script.wait(DEADLINE)
    assert {kind for kind, *_ in ready} == {"ready"}
    for kind, cause in cancelled:
        assert kind == "cancelled"
        assert f"the supervisor process (pid {script.pid}) died" in cause
    descendants = {pid: ds for _, pid, ds, _ in ready}
    ((_, stubborn_descendants),) = [(p, ds) for _, p, ds, honour in ready if not honour]
    # The task ignoring its token lives until the grace period ends, then dies with its tree (it
    # is a subreaper: its setsid() descendants are still below it). The orphans of the task that
    # returned are killed too: they reparent to the zygote or (fork) the task's shim, subreapers.
    doomed = [*descendants, *stubborn_descendants, *(d for ds in descendants.values() for d in ds)]
    try:
        assert all(process_gone(pid, DEADLINE) for pid in doomed)
    finally:
        _kill([d for ds in descendants.values() for d in ds])


def test_interpreter_exit_stops_live_tasks(
    start_method: str, report_pipe: tuple[Connection, int]
) -> None:
    """Test that a program exiting with a live, stubborn task does not hang: the task is
    cancelled, given its grace, killed with its tree, and the program exits."""
    reader, fd = report_pipe
    script = _script("exit", start_method, 0.2, fd)
    try:
        (ready, pid, descendants, _), (kind, cause) = _receive(reader, 2)
        assert script.wait(DEADLINE) == 0
    finally:
        script.kill()
        script.wait(DEADLINE)
    assert (ready, kind, cause) == ("ready", "cancelled", "Supervisor shut down")
    assert all(process_gone(p, DEADLINE) for p in [pid, *descendants])


def test_signal_handlers_cancel_then_shut_down(report_pipe: tuple[Connection, int]) -> None:
    """Test that install_signal_handlers() makes SIGTERM cancel the root (the signal named in the
    cause) and a second signal (SIGINT) shut down, killing a task that ignores cancellation."""
    reader, fd = report_pipe
    script = _script("signals", "forkserver", 30.0, fd)
    try:
        ((_, pid, descendants, _),) = _receive(reader, 1)
        script.send_signal(signal.SIGTERM)
        first = _receive(reader, 2)
        script.send_signal(signal.SIGINT)
        ((kind, message, stopped),) = _receive(reader, 1)
        assert script.wait(DEADLINE) == 0
    finally:
        script.kill()
        script.wait(DEADLINE)
    cause = "Supervisor received SIGTERM (signal 15)"
    assert sorted(first) == [("cancelled", cause), ("root", cause)]
    assert kind == "joined"
    assert stopped
    assert "stopped on request: it did not honour cancellation within 1.0 s" in message
    assert all(process_gone(p, DEADLINE) for p in [pid, *descendants])


def test_signal_handlers_need_the_main_thread(runtime: Supervisor) -> None:
    """Test that install_signal_handlers() refuses other threads, and shutdown() restores."""
    import threading

    errors: list[BaseException] = []
    thread = threading.Thread(
        target=lambda: _capture(runtime.install_signal_handlers, errors), name="not-main"
    )
    thread.start()
    thread.join(DEADLINE)
    assert isinstance(errors[0], RuntimeError)
    before = signal.getsignal(signal.SIGTERM)
    runtime.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not before
    runtime.shutdown()
    assert signal.getsignal(signal.SIGTERM) is before


class _SignalsScript:
    """``tests.signals_script`` running ``scenario``: its stdout lines, read with a deadline."""

    def __init__(self, scenario: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.signals_script", scenario],
            stdout=subprocess.PIPE,
            bufsize=0,
            cwd=ROOT,
        )
        self._buffer = b""

    def line(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            assert select.select([fd], [], [], DEADLINE)[0], f"no line after {self._buffer!r}"
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF after {self._buffer!r}"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def signal(self, signum: int, answer: str) -> None:
        self.proc.send_signal(signum)
        assert self.line() == answer

    def exit_status(self) -> int:
        out, _ = self.proc.communicate(timeout=DEADLINE)
        assert self._buffer + out == b""
        return self.proc.returncode

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=DEADLINE)


@pytest.fixture
def signals_script() -> Iterator[Callable[[str], _SignalsScript]]:
    """Start ``tests.signals_script``; the scripts started are killed after the test."""
    scripts: list[_SignalsScript] = []

    def start(scenario: str) -> _SignalsScript:
        scripts.append(_SignalsScript(scenario))
        return scripts[-1]

    yield start
    for script in scripts:
        script.close()


@pytest.mark.parametrize(
    ("scenario", "ready"),
    [("two", "ready True"), ("thread", "ready")],
    ids=["two_supervisors_shut_down_in_creation_order", "shut_down_on_another_thread"],
)
def test_signal_handlers_pass_signals_on_once_shut_down(
    signals_script: Callable[[str], _SignalsScript], scenario: str, ready: str
) -> None:
    """Test that once their supervisors have shut down, SIGINT raises KeyboardInterrupt and
    SIGTERM ends the process, as before install_signal_handlers(): after two supervisors shut
    down in creation order ("ready True": the original SIGINT handler is back), and after a
    shutdown() on a worker thread (whose handlers stay installed, passing every signal on)."""
    script = signals_script(scenario)
    assert script.line() == ready
    script.signal(signal.SIGINT, "interrupted")
    script.proc.send_signal(signal.SIGTERM)
    assert script.exit_status() == -signal.SIGTERM


def test_signal_handlers_pass_the_third_signal_on(
    signals_script: Callable[[str], _SignalsScript],
) -> None:
    """Test that the first SIGINT cancels the root, the second shuts down, and the third raises
    KeyboardInterrupt in a main loop that does not watch the token (then SIGTERM ends it)."""
    script = signals_script("third")
    assert script.line() == "ready"
    script.signal(signal.SIGINT, "cancelled Supervisor received SIGINT (signal 2)")
    script.signal(signal.SIGINT, "shut down")
    script.signal(signal.SIGINT, "interrupted")
    script.proc.send_signal(signal.SIGTERM)
    assert script.exit_status() == -signal.SIGTERM


def test_signal_handlers_call_a_python_previous_handler_once_shut_down() -> None:
    """Test that after shutdown() on another thread the handlers, still installed, call the Python
    handler they replaced, and that shutdown() on the main thread then puts it back."""
    seen: list[int] = []

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        sup = Supervisor()
        sup.install_signal_handlers()
        worker = threading.Thread(target=sup.shutdown, name="not-main")
        worker.start()
        worker.join(DEADLINE)
        assert signal.getsignal(signal.SIGTERM) is not handler
        signal.raise_signal(signal.SIGTERM)  # runs the handler before it returns
        assert seen == [signal.SIGTERM]
        sup.shutdown()
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def _capture(fn: Callable[[], object], errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


@pytest.fixture
def unkillable(
    runtime: Supervisor, pipe: Pipe, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CriticalTaskExecutionHandle[Any]]:
    """A running task whose SIGKILL is turned into SIGSTOP, as a D-state process would resist it;
    afterwards it is killed for real, must end as "stopped on request", and its tree is reaped."""
    reader, writer = pipe()
    handle = runtime.spawn(contain_tasks.make_tree, "stuck", args=(writer, "hang"))
    writer.close()
    assert reader.poll(DEADLINE)
    descendants = reader.recv()

    kill_trees = _contain.kill_trees

    def resist(roots: list[psutil.Process]) -> None:  # the task resists, a fork shim does not
        for root in roots:
            if root.pid == handle.pid:
                os.kill(root.pid, signal.SIGSTOP)
            else:
                kill_trees([root])

    monkeypatch.setattr(_contain, "kill_trees", resist)
    monkeypatch.setattr(_contain, "KILL_WAIT", 0.2)
    yield handle
    assert not handle.is_finished()
    os.kill(handle.pid, signal.SIGKILL)
    with pytest.raises(TaskCrashedError, match="stopped on request"):
        handle.join(DEADLINE)
    if runtime.closed:  # shut down while the task was stuck: the thread ends once it is reaped
        assert runtime._backend.join(DEADLINE)
    _kill(descendants)
    assert all(process_gone(pid, DEADLINE) for pid in descendants)


def test_a_process_that_survives_sigkill_is_reported_and_shutdown_returns(
    runtime: Supervisor, unkillable: CriticalTaskExecutionHandle[Any], caplog: Any
) -> None:
    """Test that a task still there after SIGKILL is reported with its pid and /proc state, and
    shutdown() returns anyway."""
    with caplog.at_level(logging.ERROR, logger="procsup"):
        runtime.shutdown(timeout=0)
    assert f"task 'stuck' pid {unkillable.pid}: T (stopped)" in caplog.text


def test_stop_of_a_process_that_survives_sigkill_raises_at_once(
    unkillable: CriticalTaskExecutionHandle[Any],
) -> None:
    """Test that stop() does not wait for a task that survives SIGKILL: TimeoutError with its
    pid and /proc state, and the task stays supervised."""
    with pytest.raises(TimeoutError, match=rf"pid {unkillable.pid}: T \(stopped\)"):
        unkillable.stop(timeout=0)


def test_ctrl_c_before_the_supervision_thread_has_the_task_leaves_nothing(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a KeyboardInterrupt after the task started but before the supervision thread
    watches it kills and reaps the task and closes every fd (the autouse leak check sees any
    left), even when a second one interrupts that clean-up."""

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    kill_tree = _contain.kill_tree
    calls: list[int] = []

    def interrupted_once(pid: int, signum: int = signal.SIGKILL) -> None:
        calls.append(pid)
        if len(calls) == 1:
            raise KeyboardInterrupt
        kill_tree(pid, signum)

    monkeypatch.setattr(_launch, "TaskRecord", interrupted)
    monkeypatch.setattr(_contain, "kill_tree", interrupted_once)
    with Supervisor(start_method=start_method) as sup, pytest.raises(KeyboardInterrupt):
        sup.spawn(tasks.return_value, "interrupted", args=(1,))
    assert len(calls) == 2
