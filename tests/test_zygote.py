"""The lean process starters: the preloaded zygote and the direct fork."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from procsup import CancellationToken
from procsup._zygote import ForkProcess, ZygoteProcess, _Zygote
from tests import process_tasks

DEADLINE = 10.0
STARTERS = {"zygote": ZygoteProcess, "fork": ForkProcess}


@pytest.fixture(params=list(STARTERS))
def starter(request: pytest.FixtureRequest) -> Callable[..., Any]:
    cls = STARTERS[request.param]

    def make(target: Callable[..., Any], *args: Any) -> Any:
        proc = cls(target, args)
        proc.start()
        return proc

    return make


def finish(proc: Any) -> int:
    proc.join(DEADLINE)
    code = proc.exitcode
    assert code is not None, "the process did not exit in time"
    proc.close()
    return int(code)


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])
def test_target_gets_tokens_connections_and_big_args(
    starter: Callable[..., Any], size: int
) -> None:
    """Test that tokens, connections and payloads of any size reach the child intact."""
    token = CancellationToken()
    reader, writer = mp.Pipe(duplex=False)
    payload = os.urandom(size)
    proc = starter(process_tasks.echo, writer, token, payload)
    writer.close()
    assert reader.poll(DEADLINE)
    pid, cancelled, length, head, tail = reader.recv()
    reader.close()
    assert finish(proc) == 0
    assert (pid, cancelled, length, head, tail) == (
        proc.pid,
        False,
        size,
        payload[:4],
        payload[-4:],
    )
    assert token.cause == "from the child"


@pytest.mark.parametrize(
    ("target", "args", "code"),
    [
        (process_tasks.exit_with, (0,), 0),
        (process_tasks.exit_with, (3,), 3),
        (process_tasks.raise_system_exit, (None,), 0),
        (process_tasks.raise_system_exit, (4,), 4),
        (process_tasks.raise_error, (), 1),
        (process_tasks.segfault, (), -signal.SIGSEGV),
        (process_tasks.kill_self, (signal.SIGKILL,), -signal.SIGKILL),
        (process_tasks.kill_self, (signal.SIGABRT,), -signal.SIGABRT),
    ],
)
def test_exit_codes_follow_multiprocessing(
    starter: Callable[..., Any], target: Callable[..., None], args: tuple[Any, ...], code: int
) -> None:
    """Test that exit codes are reported as multiprocessing does (-N for signal N)."""
    assert finish(starter(target, *args)) == code


def test_sentinel_ignores_grandchildren_holding_fds(starter: Callable[..., Any]) -> None:
    """Test that the exit is seen while a grandchild still holds every fd the child had."""
    reader, writer = mp.Pipe(duplex=False)
    proc = starter(process_tasks.fork_holder_then_exit, writer)
    writer.close()
    assert reader.poll(DEADLINE)
    grandchild = psutil.Process(reader.recv())
    reader.close()
    try:
        assert finish(proc) == 0
        assert grandchild.is_running()
    finally:
        grandchild.kill()
        grandchild.wait(DEADLINE)


def test_zygote_death_fires_sentinels_kills_its_tasks_and_a_new_zygote_starts() -> None:
    """Test that if the zygote dies its tasks' sentinels fire and its tasks die with it
    (PR_SET_PDEATHSIG: the reported SIGKILL is true), and the next start gets a new zygote."""
    token = CancellationToken()
    reader, writer = mp.Pipe(duplex=False)
    proc = ZygoteProcess(process_tasks.wait_then_report, (writer, token))
    proc.start()
    writer.close()
    assert reader.poll(DEADLINE)
    assert reader.recv() == "waiting"
    zygote = _Zygote.get()
    old = zygote._process.pid
    task = psutil.Process(proc.pid)
    zygote._process.kill()
    zygote._process.wait(DEADLINE)
    assert finish(proc) == -signal.SIGKILL  # status lost with the zygote
    task.wait(DEADLINE)  # reaped by init: killed with its zygote
    assert reader.poll(DEADLINE)
    with pytest.raises(EOFError):
        reader.recv()
    reader.close()
    assert finish(_start(process_tasks.exit_with, 0)) == 0
    assert _Zygote.get()._process.pid != old


def _start(target: Callable[..., Any], *args: Any) -> ZygoteProcess:
    proc = ZygoteProcess(target, args)
    proc.start()
    return proc
