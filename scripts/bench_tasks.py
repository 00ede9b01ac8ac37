"""Task bodies for scripts/bench.py: importable, so they take the fast path, by reference (the
zygote cannot see ``__main__``: what is defined there travels by value)."""

from __future__ import annotations

import os
import signal
import struct
import time
from multiprocessing.connection import Connection

from procsup import CancellationToken

STAMP = struct.Struct("d")


def trivial(token: CancellationToken) -> int:
    return 1


def stamp_and_die(token: CancellationToken, conn: Connection) -> None:
    """Write the clock (CLOCK_MONOTONIC, shared by all processes), then SIGKILL ourselves."""
    os.write(conn.fileno(), STAMP.pack(time.perf_counter()))
    os.kill(os.getpid(), signal.SIGKILL)


def idle(token: CancellationToken) -> None:
    token.wait()


def idle_plain(conn: Connection) -> None:
    conn.recv_bytes()


def die(token: CancellationToken) -> None:
    """Crash without reporting (SIGKILL), as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def ident(x: int) -> int:
    """A trivial executor item."""
    return x


def stamp_then_die(path: str) -> None:
    """An executor item: write the clock (CLOCK_MONOTONIC, shared by all processes) to ``path``,
    then SIGKILL our worker."""
    with open(path, "wb") as f:
        f.write(STAMP.pack(time.perf_counter()))
    os.kill(os.getpid(), signal.SIGKILL)


def started_at() -> float:
    """An executor item: when it started, on the clock ``stamp_then_die`` writes."""
    return time.perf_counter()


def die_item() -> None:
    """An executor item that crashes its worker (SIGKILL)."""
    os.kill(os.getpid(), signal.SIGKILL)
