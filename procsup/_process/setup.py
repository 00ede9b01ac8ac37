"""What a task process sets up before the task runs: log forwarding, output capture, limits.

::

    Supervisor._start()                              task process, inside _task.main()
    ───────────────────                              ─────────────────────────────────
    setup, channels = open_channels(d, capture, limits)
    target = Prepared(task_fn, setup)   ── args ──▶  target(token, *args, **kwargs):
    setup.close() after the start                       setrlimit(RLIMIT_DATA / RLIMIT_CPU)
    channels ─▶ TaskRecord ─▶ Monitor                    fd 1, fd 2 onto the capture pipes
                                                         root logger ─▶ Forwarder(log socket)
                                                         task_fn(token, *args, **kwargs)

``Prepared`` wraps the task function rather than adding a step to ``_task.main``: everything the
child needs travels in the pickle that already carries the function, and it runs after the child's
signal and process-group policy, exactly once, under every start method.

Things that don't work
----------------------
- ``RLIMIT_AS`` for ``memory_limit``: it counts address space never touched (glibc reserves 64 MiB
  per thread arena, every shared library, the token arena's mapping), so a task with a few threads
  hits it with little memory in use. ``RLIMIT_DATA`` (Linux >= 4.7) counts private writable memory:
  the heap and anonymous mappings, thread stacks included.
- A psutil RSS watchdog in the supervisor: it must poll, and a task can allocate gigabytes between
  two samples. The kernel's limit fails the allocation itself, which Python raises as MemoryError.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import resource
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from procsup._os.proc import human_size
from procsup._process.logs import (
    LinePrinter,
    LogChannel,
    OutputChannel,
    install_forwarder,
    logger_levels,
)

__all__ = ["ChildSetup", "Prepared", "open_channels", "over_limit"]

T = TypeVar("T")


@dataclass(frozen=True)
class ChildSetup:
    """Everything a task process applies before its task runs; picklable (Connections by fd)."""

    log: Connection
    root_level: int
    levels: dict[str, int]
    # Captured stdout, or None; stderr always has its pipe (procsup._process.stdio).
    stdout: Connection | None
    memory_limit: int | None
    cpu_time_limit: float | None

    def close(self) -> None:
        """Close the supervisor's copies of the child's ends (after the start)."""
        self.log.close()
        if self.stdout is not None:
            self.stdout.close()

    def apply(self) -> None:
        """In the task process: limits first, then output, then logging."""
        if self.memory_limit is not None:
            _lower(resource.RLIMIT_DATA, self.memory_limit, self.memory_limit)
        if self.cpu_time_limit is not None:
            # Whole seconds: SIGXCPU at the soft limit, SIGKILL one second later if it is caught.
            soft = math.ceil(self.cpu_time_limit)
            _lower(resource.RLIMIT_CPU, soft, soft + 1)
        if self.stdout is not None:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.dup2(self.stdout.fileno(), 1)
            self.stdout.close()
            # A fresh stream on the fd: under fork, sys.stdout may be the parent's in-memory
            # capture (pytest's), and line-buffered, so lines show as they happen, not at exit.
            sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        install_forwarder(self.log.fileno(), self.root_level, self.levels)


def _lower(which: int, soft: int, hard: int) -> None:
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


class Prepared:
    """The task function, wrapped so the child applies its ``ChildSetup`` first."""

    def __init__(self, task_fn: Callable[..., Any], setup: ChildSetup) -> None:
        self.task_fn = task_fn
        self.setup = setup

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.setup.apply()
        try:
            value = self.task_fn(*args, **kwargs)
        except MemoryError as exc:
            raise self._over_limit(exc) from exc
        if self.setup.memory_limit is not None and inspect.isawaitable(value):
            return self._guard(value)
        return value

    async def _guard(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except MemoryError as exc:
            raise self._over_limit(exc) from exc

    def _over_limit(self, exc: MemoryError) -> MemoryError:
        return over_limit(exc, self.setup.memory_limit)


def over_limit(exc: MemoryError, limit: int | None) -> MemoryError:
    """The MemoryError to report for ``exc`` under ``memory_limit=limit``: one that says the limit
    was hit (``exc`` itself when there is no limit)."""
    if limit is None:
        return exc
    detail = f": {exc}" if str(exc) else ""
    return MemoryError(
        f"memory limit exceeded (memory_limit={human_size(limit)}, RLIMIT_DATA){detail}"
    )


def open_channels(
    description: str,
    *,
    capture_output: bool,
    memory_limit: int | None,
    cpu_time_limit: float | None,
) -> tuple[ChildSetup, list[LogChannel | OutputChannel], LinePrinter | None]:
    """Make the pipes of one task: its setup (to pass to the child), the supervisor's ends, and,
    with ``capture_output``, the printer to put on the task's ``StderrTap.forward``.

    Captured stderr goes through the task's one stderr pipe (``procsup._process.stdio``), so the
    crash record keeps its tail and faulthandler dump; only stdout gets a pipe of its own here.
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setblocking(False)
    channels: list[LogChannel | OutputChannel] = [LogChannel(mine, description)]
    stdout: Connection | None = None
    stderr_printer: LinePrinter | None = None
    if capture_output:
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(write_end, True)  # the task writes as to a terminal: blocking
        channels.append(OutputChannel(read_end, "stdout", description))
        stdout = Connection(write_end, readable=False)
        stderr_printer = LinePrinter("stderr", description)
    root_level, levels = logger_levels()
    setup = ChildSetup(
        log=Connection(theirs.detach()),
        root_level=root_level,
        levels=levels,
        stdout=stdout,
        memory_limit=memory_limit,
        cpu_time_limit=cpu_time_limit,
    )
    return setup, channels, stderr_printer
