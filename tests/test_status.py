"""Live status (Supervisor.tasks()), lifecycle events, and asyncio: nothing blocks the loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection as mpc
import os
import reprlib
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import procsup._token.futex
from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    EventStream,
    Supervisor,
    TaskCrashedError,
    TaskEvent,
)
from procsup._token.arena import Arena
from tests import daemon_tasks, tasks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]
FAST = (0.005, 0.02)


def test_tasks_snapshots(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that tasks() describes each live task, with RSS and CPU from psutil."""
    reader, writer = pipe()
    handles = [runtime.spawn(tasks.wait_for_cancel, f"idle {i}", args=(writer,)) for i in range(2)]
    for _ in handles:
        assert reader.poll(DEADLINE)
        reader.recv()
    snapshots = runtime.tasks()
    assert [s.description for s in snapshots] == ["idle 0", "idle 1"]
    assert [s.pid for s in snapshots] == [h.pid for h in handles]
    for snap in snapshots:
        assert snap.state == "running"
        assert snap.uptime > 0
        assert snap.restarts == 0
        assert (snap.rss or 0) > 1 << 20
        assert (snap.cpu_percent or 0.0) >= 0.0
        assert snap.cpu_percent is not None
    assert runtime.tasks()[0].cpu_percent is not None  # the second sample is since the first
    handles[0].cancel()
    assert runtime.tasks()[0].state in ("cancelling", "running")  # it may have gone already
    assert handles[0].join(DEADLINE) == "cancelled"
    assert [s.description for s in runtime.tasks()] == ["idle 1"]
    handles[1].cancel()
    handles[1].join(DEADLINE)
    assert runtime.tasks() == []


def _kinds(events: list[TaskEvent]) -> list[str]:
    return [e.kind for e in events]


def test_events_of_a_restarting_task(runtime: Supervisor, tmp_path: Path) -> None:
    """Test the event stream of a task that fails, crashes, and then escalates."""
    parent = CancellationToken()
    seen: list[TaskEvent] = []
    remove = runtime.on_event(seen.append)
    with runtime.events() as stream:
        h = runtime.spawn(
            daemon_tasks.crash_until,
            "unlucky",
            args=(str(tmp_path / "runs"), 100),
            parent_token=parent,
            restart="transient",
            max_restarts=1,
            backoff=FAST,
        )
        with pytest.raises(TaskCrashedError):
            h.join(DEADLINE)
        events = [stream.get(DEADLINE) for _ in range(5)]
        with pytest.raises(TimeoutError):
            stream.get(0)
    remove()
    assert _kinds(events) == ["started", "crashed", "restarted", "crashed", "escalated"]
    assert _kinds(seen) == _kinds(events)
    assert events[0].pid != events[2].pid == h.pid
    assert [e.restarts for e in events] == [0, 0, 1, 1, 1]
    assert isinstance(events[1].error, TaskCrashedError)
    assert "SIGKILL" in events[1].detail
    assert "restart intensity" in events[4].detail
    assert all(e.description == "unlucky" for e in events)


def test_events_of_simple_outcomes(runtime: Supervisor, pipe: Pipe) -> None:
    """Test finished, failed and cancelled (graceful and by stop()) events."""
    reader, writer = pipe()
    with runtime.events() as stream:
        runtime.spawn(tasks.return_value, "ok", args=(1,)).join(DEADLINE)
        bad = runtime.spawn(tasks.fail, "bad", parent_token=CancellationToken())
        with pytest.raises(Exception, match="Critical task 'bad' failed"):
            bad.join(DEADLINE)
        polite = runtime.spawn(tasks.wait_for_cancel, "polite", args=(writer,))
        assert reader.poll(DEADLINE)
        polite.cancel()
        polite.join(DEADLINE)
        stubborn = runtime.spawn(tasks.ignore_cancel, "stubborn", args=(writer,))
        assert reader.poll(DEADLINE)
        with pytest.raises(TaskCrashedError):
            stubborn.stop(0)
        events = [stream.get(DEADLINE) for _ in range(8)]
    assert [(e.description, e.kind) for e in events] == [
        ("ok", "started"),
        ("ok", "finished"),
        ("bad", "started"),
        ("bad", "failed"),
        ("polite", "started"),
        ("polite", "cancelled"),
        ("stubborn", "started"),
        ("stubborn", "cancelled"),
    ]
    assert isinstance(events[7].error, TaskCrashedError)
    assert events[7].error.stopped
    with pytest.raises(StopIteration):
        next(iter(stream))


# ---------------------------------------------------------------- asyncio
#
# "Nothing blocks the event loop" is a property of the calls made on the loop's thread, not of how
# soon the OS schedules that thread: on two shared cores the loop can stall for a time slice
# whatever procsup does (a hog holds the CPU, another thread holds the GIL). So the test watches
# the calls themselves. Every primitive that waits for something outside the thread is wrapped;
# on the loop thread, a wait with a timeout other than 0, or a read from a blocking fd (whether it
# blocks is then up to timing), is recorded with where it came from. Each loop callback's CPU time
# is recorded too: what the thread itself computed (a busy wait, a fork), which waiting for a CPU
# or the GIL does not add to. Short mutexes (threading locks, the token arena's lock, whatever
# waits it makes inside) are critical sections, not waits for an event: they are not counted.

CPU_PER_CALLBACK = 0.02  # seconds of the loop thread's own CPU; callbacks here take about 1 ms


class LoopBlocked(AssertionError):
    """A wait on the loop thread: raised at once, as the wait could deadlock the test."""


def _waits(timeout: float | None) -> bool:
    return timeout is None or timeout > 0


class LoopWatch:
    """Wraps the blocking primitives procsup could call; records what the loop thread calls.

    ``calls`` (None: not recording) gets one line per blocking call made on the loop thread; with
    ``strict``, a wait (not a read: that could leave a peer's reply unread) also raises LoopBlocked.
    ``cpu`` (None: not measuring) gets one (CPU seconds, callback) pair per loop callback.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop_thread = threading.get_ident()
        self.calls: list[str] | None = None
        self.strict = False
        self.cpu: list[tuple[float, asyncio.Handle]] | None = None
        self._patch = monkeypatch
        self._wrap(time, "sleep", lambda secs: secs > 0)
        self._wrap(os, "wait", lambda: True)
        self._wrap(os, "waitpid", lambda pid, options: not options & os.WNOHANG)
        self._wrap(os, "waitid", lambda idtype, ident, options: not options & os.WNOHANG)
        self._wrap(select, "select", lambda r, w, x, timeout=None: _waits(timeout))
        self._wrap(mpc, "wait", lambda objects, timeout=None: _waits(timeout))
        self._wrap(mpc.Connection, "poll", lambda conn, timeout=0.0: _waits(timeout))
        self._wrap(threading.Condition, "wait", lambda cond, timeout=None: _waits(timeout))
        self._wrap(
            threading.Thread,
            "join",
            lambda thread, timeout=None: _waits(timeout) and thread.is_alive(),
        )
        futex_wait = procsup._token.futex.futex_wait
        for module in [m for n, m in sys.modules.items() if n.startswith("procsup")]:
            if getattr(module, "futex_wait", None) is futex_wait:
                self._wrap(module, "futex_wait", lambda address, value, timeout: _waits(timeout))
        self._wrap(os, "read", lambda fd, n: os.get_blocking(fd), read=True)
        for name in ("recv", "recv_bytes", "recv_bytes_into"):
            self._wrap(
                mpc.Connection, name, lambda conn, *_: os.get_blocking(conn.fileno()), read=True
            )
        for name in ("recv", "recv_into", "recvfrom", "recvmsg", "accept"):
            self._wrap(socket.socket, name, lambda sock, *_: sock.gettimeout() != 0, read=True)
        run = asyncio.Handle._run
        monkeypatch.setattr(asyncio.Handle, "_run", lambda handle: self._timed(run, handle))

    def start(self, calls: list[str], cpu: list[tuple[float, asyncio.Handle]]) -> None:
        """Record into these lists, strictly, from now on."""
        self.calls, self.cpu, self.strict = calls, cpu, True

    def stop(self) -> None:
        """Record nothing from now on."""
        self.calls, self.cpu, self.strict = None, None, False

    def _wrap(
        self, owner: object, name: str, blocks: Callable[..., bool], read: bool = False
    ) -> None:
        original = getattr(owner, name)
        where = f"{getattr(owner, '__name__', owner)}.{name}"

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls = self.calls
            if calls is not None and threading.get_ident() == self.loop_thread:
                try:
                    blocking = blocks(*args, **kwargs)
                except OSError:  # a closed fd and such: the call itself will say so
                    blocking = False
                if blocking and not _exempt():
                    calls.append(f"{where}{_short(args)} from {_caller()}")
                    if self.strict and not read:
                        raise LoopBlocked(f"blocking call on the event loop: {calls[-1]}")
            return original(*args, **kwargs)

        self._patch.setattr(owner, name, wrapper)

    def _timed(self, run: Callable[[asyncio.Handle], None], handle: asyncio.Handle) -> None:
        measured = self.cpu
        if measured is None or threading.get_ident() != self.loop_thread:
            run(handle)
            return
        start = time.thread_time()
        try:
            run(handle)
        finally:
            measured.append((time.thread_time() - start, handle))


# Thread.start() waits until the new thread runs (a brief handshake with the OS scheduler that
# asyncio's own executor makes whenever it grows); the token arena's lock is a mutex shared with
# other processes, however it waits for it. Waits for a token (wait_pulled) are not exempt.
_EXEMPT = {threading.Thread.start.__code__, Arena.lock.__code__, Arena._lock_within.__code__}


def _exempt() -> bool:
    """True inside Thread.start() or the token arena's lock."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code in _EXEMPT:
            return True
        frame = frame.f_back
    return False


def _short(args: tuple[Any, ...]) -> str:
    return "(" + ", ".join(reprlib.repr(arg) for arg in args) + ")"


_OURS = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("procsup", "tests"))


def _caller() -> str:
    """The innermost frames of procsup and the tests (not the stdlib's): who made the call."""
    frames = [
        f
        for f in traceback.extract_stack()[:-2]  # not _caller and the wrapper
        if f.filename.startswith(_OURS)
    ]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-1:-4:-1])


@pytest.fixture
def loop_watch(monkeypatch: pytest.MonkeyPatch) -> LoopWatch:
    """A LoopWatch for the test's thread (the one that runs the event loop)."""
    return LoopWatch(monkeypatch)


async def _handshake(reader: Connection) -> object:
    # A blocking recv would stall the loop: the loop says when the pipe is readable, and the
    # read itself never waits (a handshake is one small message, written at once).
    os.set_blocking(reader.fileno(), False)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(reader.fileno(), readable)
    try:
        await asyncio.wait_for(ready, DEADLINE)
    finally:
        loop.remove_reader(reader.fileno())
    return reader.recv()


async def _read_kinds(stream: EventStream) -> list[str]:
    """Read the stream as events come (so get_async really waits), up to the 2nd "cancelled"."""
    kinds: list[str] = []
    async for event in stream:
        kinds.append(event.kind)
        if kinds.count("cancelled") == 2:
            stream.close()
    return kinds


async def _scenario(sup: Supervisor, reader: Connection, writer: Connection, runs: str) -> None:
    """Each async API, in a state where it has to wait (a blocking form would block here)."""
    parent = CancellationToken()
    reading = asyncio.ensure_future(_read_kinds(sup.events()))
    waiting = await sup.spawn_async(tasks.wait_for_cancel, "waits", args=(writer,))
    assert await _handshake(reader) == "ready"
    flaky = await sup.spawn_async(
        daemon_tasks.fail_until,
        "flaky",
        args=(runs, 3),
        restart="transient",
        backoff=FAST,
    )
    watcher = asyncio.ensure_future(parent.cancelled())
    await asyncio.sleep(0)  # the watcher waits before the crash can have happened
    crashing = await sup.spawn_async(tasks.sigkill, "crashes", parent_token=parent)
    await asyncio.wait_for(watcher, DEADLINE)
    with pytest.raises(TaskCrashedError):
        await crashing.join_async()
    assert await asyncio.wait_for(flaky.join_async(), DEADLINE) == 3
    stubborn = await sup.spawn_async(tasks.ignore_cancel, "stubborn", args=(writer,))
    await _handshake(reader)
    with pytest.raises(TaskCrashedError, match="stopped on request"):
        await stubborn.stop_async(0.05)
    waiting.cancel()
    assert await asyncio.wait_for(waiting.join_async(), DEADLINE) == "cancelled"
    kinds = await asyncio.wait_for(reading, DEADLINE)
    assert kinds.count("restarted") == 2
    assert kinds.count("crashed") == 1


def _controls(sup: Supervisor, watch: LoopWatch) -> dict[str, list[str]]:
    """The blocking forms of the same APIs, called on the loop thread on purpose: the watch must
    see each one, or its silence about the async forms would mean nothing."""
    seen: dict[str, list[str]] = {}
    parent = CancellationToken()
    watch.calls = seen.setdefault("spawn()", [])
    handle = sup.spawn(tasks.wait_for_cancel, "control", parent_token=parent)
    watch.calls = seen.setdefault("join(timeout)", [])
    with pytest.raises(TimeoutError):
        handle.join(0.001)
    watch.calls = seen.setdefault("token.wait(timeout)", [])
    assert not parent.wait(0.001)
    watch.calls = None
    parent.cancel()
    assert handle.join(DEADLINE) == "cancelled"
    return seen


def test_nothing_blocks_the_event_loop(
    start_method: str, tmp_path: Path, loop_watch: LoopWatch
) -> None:
    """Test that no blocking call is made on the loop thread while tasks start (spawn_async),
    crash, restart and are stopped (stop_async), and while join_async/cancelled()/events wait;
    and that no loop callback computes for long (its CPU time: waiting for a CPU adds nothing)."""
    reader, writer = multiprocessing.get_context(start_method).Pipe(duplex=False)
    scenario_calls: list[str] = []
    cpu: list[tuple[float, asyncio.Handle]] = []
    controls: dict[str, list[str]] = {}

    async def main() -> None:
        with Supervisor(start_method=start_method, grace_period=1.0) as sup:
            try:
                loop_watch.start(scenario_calls, cpu)
                await asyncio.sleep(0)  # whole callbacks are measured: the next one starts watched
                await _scenario(sup, reader, writer, str(tmp_path / "runs"))
                loop_watch.stop()
                await asyncio.sleep(0)  # and the controls start one of their own, not measured
                controls.update(_controls(sup, loop_watch))
            finally:
                loop_watch.stop()
                await asyncio.to_thread(sup.shutdown)

    try:
        asyncio.run(main())
    finally:
        reader.close()
        writer.close()
    assert not scenario_calls, "blocking calls on the event loop:\n" + "\n".join(scenario_calls)
    assert all(controls.values()), f"the watch missed a blocking call: {controls}"
    assert len(cpu) > 10
    spent, worst = max(cpu, key=lambda pair: pair[0])
    assert spent < CPU_PER_CALLBACK, f"{spent * 1e3:.1f} ms of CPU on the loop in {worst!r}"


def test_spawn_async_cancelled_detaches_the_task(runtime: Supervisor) -> None:
    """Test that cancelling spawn_async leaves no undetached handle: the task is cancelled."""

    async def main() -> None:
        attempt = asyncio.ensure_future(runtime.spawn_async(tasks.wait_for_cancel, "abandoned"))
        await asyncio.sleep(0)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt

    with runtime.events() as events:
        asyncio.run(main())  # shuts the default executor down: the start has completed by then
        for snap in runtime.tasks():
            assert snap.description == "abandoned"
        kinds: list[str] = []
        while not {"cancelled", "finished"} & set(kinds):  # the cancelled task ends on its own
            event = events.get(DEADLINE)
            assert event.description == "abandoned"
            kinds.append(event.kind)
    assert runtime.tasks() == []


def test_handle_type_from_spawn_async(runtime: Supervisor) -> None:
    """Test that spawn_async returns a joinable handle."""

    async def main() -> CriticalTaskExecutionHandle[object]:
        return await runtime.spawn_async(tasks.return_value, "value", args=(5,))

    assert asyncio.run(main()).join(DEADLINE) == 5
