"""Targets for the lean process starters (importable, so the zygote can unpickle them)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

from procsup import CancellationToken


def echo(conn: Connection, token: CancellationToken, payload: bytes) -> None:
    conn.send((os.getpid(), token.is_cancelled(), len(payload), payload[:4], payload[-4:]))
    token.cancel("from the child")


def exit_with(code: int) -> None:
    os._exit(code)


def raise_system_exit(code: int | None) -> None:
    raise SystemExit(code)


def raise_error() -> None:
    raise RuntimeError("boom")


def segfault() -> None:
    ctypes.string_at(0)


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


def fork_holder_then_exit(conn: Connection) -> None:
    """Leave a grandchild that holds every fd we have, then exit."""
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        while True:
            time.sleep(3600)  # block forever: the test kills us
    conn.send(pid)
    os._exit(0)


def wait_then_report(conn: Connection, token: CancellationToken) -> None:
    conn.send("waiting")
    conn.send(token.wait(30))


def report_fds(conn: Connection, token: CancellationToken) -> None:
    """Send what our fds above 2 point to (sorted, inode numbers cut) and how many token arenas
    we map."""
    from procsup._token.arena import Arena

    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if int(name) > 2 and not target.startswith("/proc/"):  # not listdir's own fd
            targets.append(target.split("[")[0])
    conn.send((sorted(targets), len(Arena._registry)))


def report_origin(conn: Connection, variable: str) -> None:
    """Send our parent's pid, ``variable`` from our environment, our working directory, and
    whether the zygote's code is loaded here (it is in a forked child, not in a fresh one)."""
    forked = "procsup._process.server" in sys.modules
    conn.send((os.getppid(), os.environ.get(variable), os.getcwd(), forked))


def report_flags(conn: Connection) -> None:
    conn.send((sys.flags.optimize, sys.flags.dev_mode, sys.warnoptions))


def wait_for(token: CancellationToken) -> None:
    token.wait(30)
