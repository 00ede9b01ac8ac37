"""The lean process starters: the preloaded zygote and the direct fork."""

from __future__ import annotations

import ast
import contextlib
import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import CancellationToken
from procsup._process.zygote import ForkProcess, ZygoteProcess, _Zygote
from tests import process_tasks
from tests.conftest import process_gone

DEADLINE = 10.0
ROOT = Path(__file__).resolve().parents[1]
STARTERS: dict[str, Callable[..., Any]] = {
    "zygote": ZygoteProcess,
    "spawn": functools.partial(ZygoteProcess, fresh=True),
    "fork": ForkProcess,
}


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
        proc.join(DEADLINE)
        assert proc.exitcode == 0
        assert not process_gone(grandchild.pid, 0)  # a zombie counts as gone
    finally:
        proc.close()  # fork: the shim is dropped with what it holds, the grandchild included
        with contextlib.suppress(psutil.NoSuchProcess):
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


def test_a_spawn_task_is_a_fresh_interpreter_forked_by_the_zygote(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a spawn task (fresh=True) is the zygote's child yet a fresh interpreter, with the
    environment and working directory of the moment it was started, not the zygote's."""
    zygote = _Zygote.get()
    monkeypatch.setenv("PROCSUP_TEST_ORIGIN", "set after the zygote started")
    monkeypatch.chdir(tmp_path)
    results = []
    for fresh in (True, False):
        reader, writer = mp.Pipe(duplex=False)
        proc = ZygoteProcess(
            process_tasks.report_origin, (writer, "PROCSUP_TEST_ORIGIN"), fresh=fresh
        )
        proc.start()
        writer.close()
        assert reader.poll(DEADLINE)
        results.append(reader.recv())
        reader.close()
        assert finish(proc) == 0
    spawned, forked = results
    assert spawned == (zygote._process.pid, "set after the zygote started", str(tmp_path), False)
    assert forked[0] == zygote._process.pid
    assert forked[3]


def test_a_spawn_task_runs_with_the_interpreter_flags_of_its_supervisor() -> None:
    """Test that -O, -X dev and -W reach a spawn task, as multiprocessing's spawn passes them."""
    script = textwrap.dedent(
        """
        import multiprocessing as mp
        from procsup._process.zygote import ZygoteProcess
        from tests import process_tasks
        reader, writer = mp.Pipe(duplex=False)
        proc = ZygoteProcess(process_tasks.report_flags, (writer,), fresh=True)
        proc.start()
        writer.close()
        assert reader.poll(10)
        print(reader.recv())
        proc.join(10)
        """
    )
    flags = ["-O", "-X", "dev", "-W", "error::DeprecationWarning"]
    out = subprocess.run(
        [sys.executable, *flags, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=True,
    )
    optimize, dev_mode, warnings = ast.literal_eval(out.stdout.strip())
    assert (optimize, dev_mode) == (1, True)
    assert "error::DeprecationWarning" in warnings


def test_too_many_fds_for_one_task_raise_before_anything_starts() -> None:
    """Test that a start needing more fds than one message carries (a big payload takes one
    more) raises ValueError up front, instead of a task missing its last fd."""
    pipes = [mp.Pipe(duplex=False) for _ in range(249)]
    try:
        proc = ZygoteProcess(process_tasks.echo, ([w for _, w in pipes], b"x" * 100_000))
        with pytest.raises(ValueError, match="at most 250 file descriptors"):
            proc.start()
        assert proc.pid is None
    finally:
        for reader, writer in pipes:
            reader.close()
            writer.close()


def test_a_module_on_a_path_added_after_the_zygote_started_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that the zygote gets sys.path again when it changed, so a task module importable only
    through a later entry runs."""
    _Zygote.get()
    (tmp_path / "procsup_late_module.py").write_text("def send(conn):\n    conn.send('late')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import procsup_late_module  # type: ignore[import-not-found]

    reader, writer = mp.Pipe(duplex=False)
    proc = ZygoteProcess(procsup_late_module.send, (writer,))
    proc.start()
    writer.close()
    assert reader.poll(DEADLINE)
    assert reader.recv() == "late"
    reader.close()
    assert finish(proc) == 0


def _start(target: Callable[..., Any], *args: Any) -> ZygoteProcess:
    proc = ZygoteProcess(target, args)
    proc.start()
    return proc


def _fresh_zygote() -> psutil.Process:
    """Replace this process's zygote with a new one, which has no spare yet."""
    old = _Zygote._instance
    if old is not None and old._pid == os.getpid():
        old.close()
    _Zygote._instance = None
    return psutil.Process(_Zygote.get()._process.pid)


def _spare(zygote: psutil.Process, tasks: set[int]) -> psutil.Process:
    """Wait for the zygote's spare: its one live child that is none of ``tasks``."""
    deadline = time.monotonic() + DEADLINE
    while True:
        spares = []
        for child in zygote.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.pid not in tasks and child.status() != psutil.STATUS_ZOMBIE:
                    spares.append(child)
        if spares:
            (spare,) = spares
            return spare
        assert time.monotonic() < deadline, "the zygote forked no spare"
        time.sleep(0.01)  # nothing to block on: when to fork a spare is the zygote's business


def _own_fds(arenas: int) -> list[str]:
    """What ``report_fds`` must see: its pipe, and per token arena the fd and the mmap's own dup."""
    return ["/memfd:procsup-tokens (deleted)"] * (2 * arenas) + ["pipe:"]


def _task_fds(token: CancellationToken) -> tuple[int, list[str], int]:
    """Start a task on ``token`` that reports its fds; its pid, fd targets and arena count."""
    reader, writer = mp.Pipe(duplex=False)
    proc = ZygoteProcess(process_tasks.report_fds, (writer, token), token=token)
    proc.start()
    writer.close()
    assert reader.poll(DEADLINE)
    targets, arenas = reader.recv()
    reader.close()
    pid = proc.pid
    assert pid is not None
    assert finish(proc) == 0
    return pid, targets, arenas


def test_the_next_start_takes_the_spare_and_a_dead_spare_is_replaced() -> None:
    """Test that the zygote forks a spare after a start and the next start is that process; that
    a task holds only its own fds (its pipe, one per token arena) whether it was the spare or was
    forked; and that a spare that died idle is passed over (the start forks), then replaced."""
    zygote = _fresh_zygote()
    token = CancellationToken()
    reader, writer = mp.Pipe(duplex=False)
    # A live task: the zygote holds its status pipe while it forks, and no other task may.
    holder = ZygoteProcess(process_tasks.wait_then_report, (writer, token), token=token)
    holder.start()
    writer.close()
    assert holder.pid is not None
    try:
        assert reader.poll(DEADLINE)
        assert reader.recv() == "waiting"
        spare = _spare(zygote, {holder.pid})
        pid, targets, arenas = _task_fds(token)
        assert pid == spare.pid
        assert targets == _own_fds(arenas)
        dead = _spare(zygote, {holder.pid, pid})
        dead.kill()
        assert process_gone(dead.pid, DEADLINE)
        pid, targets, arenas = _task_fds(token)
        assert pid != dead.pid
        assert targets == _own_fds(arenas)
        _spare(zygote, {holder.pid, pid})
        token.cancel()
        assert reader.poll(DEADLINE)
        assert reader.recv() is True
        assert finish(holder) == 0
    finally:
        token.cancel()
        reader.close()
        holder.join(DEADLINE)
        holder.close()


def test_a_zygote_whose_supervisor_is_gone_leaves_no_spare() -> None:
    """Test that when the zygote's socket closes (its supervisor is gone), its spare dies too."""
    zygote = _fresh_zygote()
    proc = _start(process_tasks.exit_with, 0)
    assert proc.pid is not None
    assert finish(proc) == 0
    spare = _spare(zygote, {proc.pid})
    instance = _Zygote._instance
    assert instance is not None
    instance.close()
    _Zygote._instance = None
    assert process_gone(spare.pid, DEADLINE)
    assert process_gone(zygote.pid, DEADLINE)


def test_importing_procsup_leaves_asyncio_out_of_the_zygote() -> None:
    """Test that neither ``import procsup`` nor the zygote's own module imports asyncio: every task
    forked from the zygote would inherit its pages (ssl with it, ~5 MB)."""
    code = (
        "import sys, procsup, procsup._process.server\n"
        "heavy = sorted(name for name in ('asyncio', 'ssl') if name in sys.modules)\n"
        "assert not heavy, f'import procsup imported {heavy}'"
    )
    subprocess.run([sys.executable, "-c", code], timeout=DEADLINE, cwd=ROOT, check=True)


def test_the_zygote_imports_asyncio_for_the_first_async_task_only() -> None:
    """Test, in a fresh supervisor process, that a sync task leaves asyncio out of the zygote, and
    that an async task from a module that does not import asyncio still runs, and has the zygote
    import asyncio once for the tasks forked after it."""
    code = textwrap.dedent(
        """
        import sys
        import psutil
        from procsup import Supervisor
        from procsup._process.messages import Sync
        from procsup._process.zygote import _Zygote
        from tests import asyncless_tasks as tasks

        def zygote_has_asyncio():
            children = psutil.Process().children()
            (zygote,) = [p for p in children if "procsup._process.server" in " ".join(p.cmdline())]
            with open(f"/proc/{zygote.pid}/maps") as maps:
                return "/_asyncio." in maps.read()

        with Supervisor() as sup:
            assert sup.spawn(tasks.value, "sync", args=(1,)).join(10) == 1
            assert not zygote_has_asyncio(), "the zygote imported asyncio for a sync task"
            assert sup.spawn(tasks.async_value, "async", args=(2,)).join(10) == 2
            # The zygote imports after it replied; one more request and reply (it serves them in
            # order) is the handshake that it is done.
            _Zygote.get().sync()  # no change: no request; then one that is answered in order
            _Zygote.get()._call(Sync(list(sys.path), list(sys.argv), "/"), [])
            assert zygote_has_asyncio(), "the zygote did not import asyncio"
            assert sup.spawn(tasks.async_value, "async", args=(3,)).join(10) == 3
        assert "asyncio" not in sys.modules, "the supervisor imported asyncio"
        """
    )
    subprocess.run([sys.executable, "-c", code], timeout=30, cwd=ROOT, check=True)


def test_sigterm_or_sighup_to_the_process_group_leaves_the_zygote_guarding() -> None:
    """Test that SIGTERM and SIGHUP (sent to the supervisor's process group, say) do not end the
    zygote, the guardian: it learns of the supervisor's death from its socket; and that the
    tasks it starts still take SIGTERM (unblocked in every child)."""
    zygote = _Zygote.get()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        zygote._process.send_signal(signum)
    proc = ZygoteProcess(process_tasks.kill_self, (signal.SIGTERM,))
    proc.start()
    assert finish(proc) == -signal.SIGTERM
    assert _Zygote.get() is zygote
    assert zygote._process.poll() is None
