"""Task functions for the critical-task tests: importable, so they pickle by reference.

Every blocking wait here has a deadline (``DEADLINE``): a test that goes wrong fails, never hangs.
Handshakes travel over a ``multiprocessing`` Connection passed in the task's args.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import os
import resource
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from procsup import CancellationToken, Supervisor, current_token

DEADLINE = 30.0  # seconds; far beyond anything a passing test waits
HUGE = 64 * 1024 * 1024


class Panic(BaseException):
    """Stands for a Rust panic: a BaseException that is not an Exception."""


class UnpicklableError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class Unpicklable:
    """A return value that cannot be pickled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def _no_core() -> None:
    # A crash test must not spend seconds writing a core file, nor fill the log with the
    # faulthandler dump a fork child inherits from pytest.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.disable()


# ---------------------------------------------------------------- outcomes


def touch(token: CancellationToken, path: str) -> None:
    Path(path).write_text("done")


def return_value(token: CancellationToken, value: Any) -> Any:
    return value


def token_state(token: CancellationToken) -> tuple[bool, str | None]:
    return token.is_cancelled(), token.cause


def fail(token: CancellationToken, message: str = "Critical task failed!") -> None:
    raise RuntimeError(message)


def fail_chained(token: CancellationToken) -> None:
    table: dict[str, int] = {}
    try:
        table["missing"]
    except KeyError as exc:
        raise ValueError("lookup failed") from exc


def panic(token: CancellationToken, message: str = "Something went terribly wrong!") -> None:
    raise Panic(message)


def sigkill(token: CancellationToken) -> None:
    _no_core()
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(token: CancellationToken) -> None:
    _no_core()
    ctypes.string_at(0)


def abort(token: CancellationToken) -> None:
    _no_core()
    os.abort()


def hard_exit(token: CancellationToken, code: int) -> None:
    os._exit(code)


def system_exit(token: CancellationToken, code: int | None) -> None:
    raise SystemExit(code)


def keyboard_interrupt(token: CancellationToken) -> None:
    raise KeyboardInterrupt


def unpicklable_error(token: CancellationToken) -> None:
    raise UnpicklableError("cannot cross")


def unpicklable_return(token: CancellationToken) -> Unpicklable:
    return Unpicklable()


def huge_return(token: CancellationToken) -> bytes:
    return bytes(range(256)) * (HUGE // 256)


# ---------------------------------------------------------------- cooperation


def wait_for_cancel(token: CancellationToken, ready: Connection | None = None) -> str:
    if ready is not None:
        ready.send("ready")
        ready.close()
    return "cancelled" if token.wait(DEADLINE) else "completed"


def work_until_cancelled(token: CancellationToken, progress: Connection) -> int:
    done = 0
    for i in range(1, 100):
        if token.is_cancelled():
            break
        done = i
        if i == 1:
            progress.send(i)  # handshake: some work is done
        token.wait(0.05)  # one unit of work; returns at once when cancelled
    progress.close()
    return done


def work_in_steps(token: CancellationToken, progress: Connection, go: Connection) -> int:
    """Do up to 99 units of work, each reported on ``progress`` and each after the first paced by
    a message on ``go``; stop at the first unit that finds the token cancelled. Return the units
    done: the test decides how many, whatever the machine's speed."""
    done = 0
    for i in range(1, 100):
        if token.is_cancelled():
            break
        done = i  # one unit of work
        progress.send(i)
        if not go.poll(DEADLINE):
            break
        go.recv()
    progress.close()
    return done


async def select_pattern(token: CancellationToken, ready: Connection) -> str | None:
    ready.send("ready")
    ready.close()
    return await token.run_until_cancelled(asyncio.sleep(DEADLINE, "completed"))


async def async_value(token: CancellationToken, value: Any) -> Any:
    await asyncio.sleep(0)
    return value


def fail_after_ready(token: CancellationToken, ready: Connection) -> None:
    ready.send("ready")
    ready.close()
    token.wait(DEADLINE)  # the test cancels this task once it has seen it start
    raise RuntimeError("failed after cancellation")


def cancel_passed_token(token: CancellationToken, other: CancellationToken) -> bool:
    other.cancel("cancelled by the task")
    return other.is_cancelled()


# ---------------------------------------------------------------- stubborn tasks


def ignore_cancel(token: CancellationToken, ready: Connection) -> None:
    ready.send(os.getpid())
    ready.close()
    time.sleep(DEADLINE)


def ignore_sigterm(token: CancellationToken, ready: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.send(os.getpid())
    ready.close()
    time.sleep(DEADLINE)


def tree_ignoring_cancel(token: CancellationToken, ready: Connection) -> None:
    pid = os.fork()
    if pid == 0:
        time.sleep(3 * DEADLINE)  # longer than the test waits for it to go: only a kill ends it
        os._exit(0)
    ready.send(pid)
    ready.close()
    time.sleep(DEADLINE)


def grandchild_then_segfault(token: CancellationToken, report: Connection) -> None:
    """Fork a grandchild holding every fd (result pipe included), then crash."""
    _no_core()
    pid = os.fork()
    if pid == 0:
        # Lives until the crash has cancelled the tree, then says so.
        report.send("cancelled" if token.wait(DEADLINE) else "timed out")
        os._exit(0)
    report.send((pid, time.monotonic()))
    ctypes.string_at(0)


def nested(token: CancellationToken, start_method: str) -> None:
    """Run a failing critical task inside this one and let its error propagate."""
    with Supervisor(start_method=start_method) as sup:
        sup.spawn(fail, "inner", args=("inner failure",), parent_token=token).join(DEADLINE)


def current_is_mine(token: CancellationToken) -> bool:
    """Whether procsup.current_token() in the task is the token it was given."""
    return current_token() == token


def surroundings(token: CancellationToken) -> tuple[str, list[str]]:
    """The task's working directory and ``sys.argv``."""
    return os.getcwd(), sys.argv


def environment(token: CancellationToken, *names: str) -> list[str | None]:
    """Each variable of the task's environment named, as ``os.environ`` and the C library
    (``getenv``, which a native library reads) see it; None where it is unset."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    seen: list[str | None] = []
    for name in names:
        native = libc.getenv(name.encode())
        assert os.environ.get(name) == (None if native is None else native.decode())
        seen.append(os.environ.get(name))
    return seen
