"""Task functions for the daemon-feature tests (restarts, logging, limits): importable, so they
pickle under spawn/forkserver. State that must survive a restart lives in a file the test owns."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from procsup import CancellationToken
from tests.tasks import DEADLINE, _no_core

logger = logging.getLogger("tests.daemon")


def _run_number(path: str) -> int:
    """Count this run in ``path`` (one byte per run) and return its number, from 1."""
    with open(path, "ab") as f:
        f.write(b"x")
    return Path(path).stat().st_size


def fail_until(token: CancellationToken, path: str, good_run: int) -> int:
    """Raise on every run before ``good_run``; then return the run number."""
    run = _run_number(path)
    if run < good_run:
        raise RuntimeError(f"run {run} failed")
    return run


def crash_until(token: CancellationToken, path: str, good_run: int) -> int:
    """SIGKILL ourselves on every run before ``good_run``; then return the run number."""
    run = _run_number(path)
    if run < good_run:
        _no_core()
        os.kill(os.getpid(), signal.SIGKILL)
    return run


def count_run(token: CancellationToken, path: str) -> int:
    """Return at once (a permanent task restarts after that too)."""
    return _run_number(path)


def cancel_own_token_then_fail(token: CancellationToken, path: str) -> bool:
    """Run 1 cancels its own token, then fails; run 2 reports whether its token is live."""
    if _run_number(path) == 1:
        token.cancel("run 1 cancelled its own token")
        raise RuntimeError("run 1 failed")
    return not token.is_cancelled()


def fail_then_wait(token: CancellationToken, path: str, ready: Connection) -> str:
    """Run 1 fails; run 2 says it started, then waits for cancellation."""
    if _run_number(path) == 1:
        raise RuntimeError("run 1 failed")
    ready.send("run 2")
    return "cancelled" if token.wait(DEADLINE) else "completed"


# ---------------------------------------------------------------- logging and output


def log_some(token: CancellationToken) -> int:
    logger.debug("debug from %s", "the task")
    logger.info("info from the task")
    logger.warning("warning %d from the task", 42, extra={"shard": 7})
    try:
        raise ValueError("logged failure")
    except ValueError:
        logger.exception("exception from the task")
    logging.getLogger("tests.daemon.quiet").info("dropped: the supervisor's level is WARNING")
    return os.getpid()


def log_then_crash(token: CancellationToken) -> None:
    _no_core()
    logger.error("last words")
    os.kill(os.getpid(), signal.SIGKILL)


def print_some(token: CancellationToken) -> None:
    print("to stdout 1")
    print("to stderr 1", file=sys.stderr)
    sys.stdout.write("no newline at the end")
    os.write(1, b"")


def complain_then_segfault(token: CancellationToken) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # faulthandler stays on: the record wants it
    print("about to touch address 0", file=sys.stderr, flush=True)
    ctypes.string_at(0)


# ---------------------------------------------------------------- limits


def allocate(token: CancellationToken, size: int) -> int:
    block = bytearray(size)
    return len(block)


def spin(token: CancellationToken) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        pass


def sleep_cooperatively(token: CancellationToken, ready: Connection) -> str:
    ready.send("ready")
    return "cancelled" if token.wait(DEADLINE) else "completed"
