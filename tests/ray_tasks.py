"""Task functions for the Ray tests: importable on every node of the test cluster.

Every node of ``ray.cluster_utils.Cluster`` is a set of processes on this machine, so a task
tells the test where it is through a FIFO (a path, which Ray carries like any string): the test
opens the read end first and waits on it with a deadline (``tests.test_ray.Fifo``). Every blocking
wait here has a deadline too; ``time.sleep`` only ever means "block until killed".
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import signal
import time

from procsup import CancellationToken

DEADLINE = 60.0  # seconds; far beyond anything a passing test waits


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def say(fifo: str, *words: object) -> None:
    """Write one line to the test's FIFO (it holds the read end open)."""
    with open(fifo, "w") as f:
        f.write(" ".join(str(word) for word in words) + "\n")


def return_value(token: CancellationToken, value: object) -> object:
    return value


def where(token: CancellationToken) -> tuple[int, bool]:
    return os.getpid(), token.is_cancelled()


def _parse(text: str) -> int:
    return int(text)


def parse_config(token: CancellationToken, text: str) -> int:
    return _parse(text)


def segfault(token: CancellationToken, fifo: str | None = None) -> None:
    _no_core()
    if fifo is not None:
        say(fifo, "crashing", os.getpid())
    ctypes.string_at(0)


def abort(token: CancellationToken) -> None:
    _no_core()
    faulthandler.disable()
    os.abort()


def wait_for_cancel(token: CancellationToken, fifo: str) -> str:
    say(fifo, "ready", os.getpid())
    if token.wait(DEADLINE):
        return f"cancelled: {token.cause}"
    return "never cancelled"


async def wait_for_cancel_async(token: CancellationToken, fifo: str) -> str:
    say(fifo, "ready", os.getpid())
    await token.cancelled()
    return f"cancelled: {token.cause}"


def ignore_cancel(token: CancellationToken, fifo: str) -> None:
    """Never honours its token: only a signal ends it."""
    say(fifo, "ready", os.getpid())
    time.sleep(DEADLINE * 10)


def ignore_sigterm(token: CancellationToken, fifo: str) -> None:
    """Ignores its token and SIGTERM: only SIGKILL ends it, and it has a child (a tree)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        time.sleep(DEADLINE * 10)
        os._exit(0)
    say(fifo, "ready", os.getpid(), child)
    time.sleep(DEADLINE * 10)


def cancel_myself(token: CancellationToken, fifo: str) -> str:
    """Cancels its own token, then waits for the driver to say it saw that (a cancel of the
    sibling token it was given the path of): the driver's copy must follow."""
    token.cancel("the task cancelled its own token")
    say(fifo, "cancelled", os.getpid())
    return "done"


def cancel_myself_at_once(token: CancellationToken) -> str:
    """Cancels its own token and returns: the outcome must bring that to the driver's copy."""
    token.cancel("the task cancelled its own token")
    return "done"


def child_tokens(token: CancellationToken, fifo: str) -> str:
    """Makes a child of its token and waits on it: an ancestor's cancel in the driver reaches it."""
    child = token.child_token()
    say(fifo, "ready", os.getpid())
    if child.wait(DEADLINE):
        return f"child cancelled: {child.cause}"
    return "never cancelled"


def allocate(token: CancellationToken, size: int) -> int:
    """Allocate and touch ``size`` bytes: over a memory_limit, the allocation fails."""
    return len(bytearray(size))


def append_pid(token: CancellationToken, path: str) -> int:
    """Append its pid to ``path`` (one line per run: a run started twice shows twice)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()
