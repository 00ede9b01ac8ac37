"""Shared fixtures: one start-method parametrization and the autouse leak check."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import psutil
import pytest

import procsup._process.zygote
from procsup import Supervisor
from procsup._supervision import supervisor as _supervisor

START_METHODS = ("forkserver", "spawn", "fork")

_LONG_LIVED_FDS = ("forkserver", "procsup-zygote", "memfd:procsup-tokens")


def process_gone(pid: int, timeout: float) -> bool:
    """Wait for any process (ours or not) to exit, through a pidfd: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Each test that takes this fixture runs once per start method."""
    return str(request.param)


@pytest.fixture
def runtime(start_method: str) -> Iterator[Supervisor]:
    """A Supervisor per test and start method, shut down (everything reaped) afterwards."""
    sup = Supervisor(start_method=start_method, grace_period=2.0)
    yield sup
    sup.shutdown()


@pytest.fixture
def pipe(start_method: str) -> Iterator[Callable[[], tuple[Connection, Connection]]]:
    """Make one-way handshake pipes ``(reader, writer)``; all are closed after the test."""
    made: list[Connection] = []

    def make() -> tuple[Connection, Connection]:
        reader, writer = multiprocessing.get_context(start_method).Pipe(duplex=False)
        made.extend((reader, writer))
        return reader, writer

    yield make
    for conn in made:
        conn.close()


@dataclass(frozen=True)
class Snapshot:
    """What the leak check compares: this process's fds, threads, descendants, /dev/shm."""

    fds: frozenset[str]
    threads: frozenset[int]
    children: frozenset[int]
    shm: frozenset[str]


def helper_pids() -> set[int]:
    """The long-lived helpers started once per process on purpose, read now (procsup's spare is
    replaced after every start): procsup's zygote and its spare, multiprocessing's forkserver and
    resource tracker. Identified by pid: a task forked by the zygote shares its command line."""
    pids = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
        *procsup._process.zygote.zygote_pids(),
    }
    return {pid for pid in pids if pid is not None}


_FOREIGN: list[Callable[[psutil.Process], bool]] = []


@contextlib.contextmanager
def foreign_processes(owned: Callable[[psutil.Process], bool]) -> Iterator[None]:
    """In this block, the leak check leaves alone the descendants that ``owned`` claims: those of a
    service that a test module starts once for all its tests and stops at its end (a Ray cluster:
    its daemons, and the worker processes it starts and ends on its own schedule). Whatever they
    start that ``owned`` does not claim (procsup's zygotes and tasks under a Ray agent) is still
    checked after every test; the module checks that the service itself left nothing."""
    _FOREIGN.append(owned)
    try:
        yield
    finally:
        _FOREIGN.remove(owned)


def _foreign(proc: psutil.Process) -> bool:
    try:
        return any(owned(proc) for owned in _FOREIGN)
    except psutil.Error:  # exiting: counted until it is gone
        return False


def _children() -> frozenset[int]:
    found = {p.pid for p in psutil.Process().children(recursive=True) if not _foreign(p)}
    # The helpers after the listing: a spare forked in between is one of them by then.
    return frozenset(found - helper_pids())


def _daemon_fds() -> set[str]:
    """The fds multiprocessing keeps open to its once-per-process helper processes."""
    fds = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_alive_fd", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_fd", None),
        *procsup._process.zygote.daemon_fds(),
    }
    return {str(fd) for fd in fds if fd is not None}


def snapshot() -> Snapshot:
    """What this process holds now, long-lived helpers left out."""
    multiprocessing.active_children()  # joins finished Process objects, closing their sentinels
    daemons = _daemon_fds()
    fds = frozenset(
        f"{fd}->{_readlink(f'/proc/self/fd/{fd}')}"
        for fd in os.listdir("/proc/self/fd")
        if fd not in daemons
    )
    return Snapshot(
        fds=fds,
        threads=frozenset(t.ident or 0 for t in threading.enumerate()),
        children=_children(),
        shm=frozenset(os.listdir("/dev/shm")),
    )


def _describe(pid: int) -> str:
    try:
        return f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:100]})"
    except psutil.Error:
        return f"{pid} (gone)"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def leaks(before: Snapshot, after: Snapshot) -> list[str]:
    """What ``after`` holds that ``before`` did not, one line per kind."""
    problems = []
    # Opened once per process on purpose: the forkserver socket, and the token arena (a memfd
    # that every token of the process family shares, mapped for the life of the process).
    new_fds = {
        fd
        for fd in after.fds - before.fds
        if not any(mark in fd for mark in _LONG_LIVED_FDS) and not fd.endswith("->?")
    }
    if new_fds:
        problems.append(f"fds left open: {sorted(new_fds)}")
    new_threads = after.threads - before.threads
    if new_threads:
        names = [t.name for t in threading.enumerate() if t.ident in new_threads]
        problems.append(f"threads left running: {names}")
    new_children = after.children - before.children
    if new_children:
        described = [_describe(pid) for pid in sorted(new_children)]
        problems.append(f"processes left running: {described}")
    new_shm = after.shm - before.shm
    if new_shm:
        problems.append(f"/dev/shm entries left: {sorted(new_shm)}")
    return problems


def wait_for_no_leaks(before: Snapshot, timeout: float) -> list[str]:
    """What is left over since ``before``, once it stays so for ``timeout`` seconds (reaping and
    thread exit are asynchronous); an empty list if nothing is."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        problems = leaks(before, snapshot())
        if not problems or time.monotonic() > deadline:
            return problems
        # Give what is exiting a bounded moment to finish.
        psutil.wait_procs(
            [psutil.Process(pid) for pid in _children() if psutil.pid_exists(pid)], timeout=0.05
        )


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves processes, fds, threads or shared memory behind."""
    before = snapshot()
    yield
    _supervisor._shutdown_default(timeout=2.0)
    problems = wait_for_no_leaks(before, 10.0)
    if problems:
        for pid in _children():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail("leak: " + "; ".join(problems))


@pytest.fixture
def report_pipe() -> Iterator[tuple[Connection, int]]:
    """A pipe whose write end (a raw fd) goes to a supervisor subprocess; the reader stays here."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    reader = Connection(read_end, writable=False)
    yield reader, write_end
    reader.close()
    try:
        os.close(write_end)
    except OSError:
        pass
