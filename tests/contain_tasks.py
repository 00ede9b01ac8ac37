"""Task functions for the containment tests: process trees, stderr, crashes (importable, so they
pickle under spawn and forkserver). Every wait has a deadline."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from procsup import CancellationToken

DEADLINE = 30.0
# Descendants sleep longer than any test waits for them to go: only a kill ends them in time.
OUTLIVE = 3 * DEADLINE


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _sleeper(new_session: bool, group: int = 0) -> list[int]:
    """Fork a child that sleeps until killed; in a new session (``setsid()``) with a child of its
    own if asked, or in process ``group`` if given. Return their pids, once they exist (and the
    child is in its group)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if group:
                os.setpgid(0, group)
            if new_session:
                os.setsid()
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(write_end)
                    time.sleep(OUTLIVE)
                    os._exit(0)
                os.write(write_end, f"{grandchild}".encode())
            os.close(write_end)
            time.sleep(OUTLIVE)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        rest = f.read()  # EOF once the child has written (or closed) its end
    return [pid, *([int(rest)] if rest else [])]


def make_tree(token: CancellationToken, report: Connection, then: str) -> None:
    """Start a Popen grandchild, a forked one, and one that left for its own session (with a
    child); report their pids (in that order); then ``then``: "segfault", "exit"
    (``os._exit(3)``), "return" or "hang" (ignoring cancellation and SIGTERM)."""
    _no_core()
    popen = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({OUTLIVE})"])
    pids = [popen.pid, *_sleeper(new_session=False), *_sleeper(new_session=True)]
    if then == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the handshake: stop() may follow
    report.send(pids)
    if then == "segfault":
        ctypes.string_at(0)
    if then == "exit":
        os._exit(3)
    if then == "return":
        return
    time.sleep(DEADLINE)


def loud_segfault(token: CancellationToken, lines: int) -> None:
    """Write ``lines`` numbered lines to stderr, then crash with faulthandler on (the default)."""
    _no_core()
    for i in range(lines):
        print(f"stderr line {i}", file=sys.stderr)
    ctypes.string_at(0)


def loud_exit(token: CancellationToken, lines: int, width: int) -> None:
    """Write ``lines`` lines of ``width`` characters straight to fd 2, then ``os._exit(3)``."""
    for i in range(lines):
        os.write(2, f"{i:05d} {'x' * width}\n".encode())
    os._exit(3)


def sigkill_self(token: CancellationToken) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def report_cancel_then_hang(
    token: CancellationToken,
    report: Connection,
    honour: bool,
    started: CancellationToken | None = None,
) -> None:
    """Report our pid and a setsid() grandchild's (and cancel ``started``, if given, to tell the
    supervisor); when cancelled, report the cause; then return (``honour``) or hang ignoring
    SIGTERM."""
    descendants = _sleeper(new_session=True)
    if not honour:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the handshake
    report.send(("ready", os.getpid(), descendants, honour))
    if started is not None:
        started.cancel("ready")
    if token.wait(DEADLINE):
        report.send(("cancelled", token.cause))
    if honour:
        return
    time.sleep(DEADLINE)


def child_tokens_then_crash(token: CancellationToken, count: int) -> None:
    """Create ``count`` child tokens (held by this process), then die without releasing them."""
    kept = [token.child_token() for _ in range(count)]
    kept.append(kept[0].child_token())
    os.kill(os.getpid(), signal.SIGKILL)


def leave_hopper(
    token: CancellationToken, report: Connection, new_session: bool, hang: bool = False
) -> None:
    """Leave behind a process that keeps forking and exiting (a new pid every few ms, in one
    process group; in its own session if ``new_session``) and holds ``report`` open for as long as
    any generation lives (3 deadlines at most); it reports its process group first. Then return,
    or (``hang``) ignore SIGTERM and sleep."""
    if hang:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:
        try:
            if new_session:
                os.setsid()
            report.send(os.getpgid(0))
            end = time.monotonic() + OUTLIVE
            while time.monotonic() < end:
                time.sleep(0.002)
                if os.fork() != 0:
                    os._exit(0)
        finally:
            os._exit(0)
    if hang:
        time.sleep(OUTLIVE)


def join_group_then_sleep(token: CancellationToken, report: Connection, group: int) -> None:
    """Fork a child that joins process group ``group`` (a stranger's, in our session), reports its
    pid and sleeps; then return."""
    (pid,) = _sleeper(new_session=False, group=group)
    report.send(pid)


def orphan_then_wait(token: CancellationToken, report: Connection, go: Connection) -> None:
    """Leave a setsid() descendant (with a child of its own); report our pid and theirs; return
    once ``go`` says so."""
    report.send((os.getpid(), _sleeper(new_session=True)))
    if go.poll(DEADLINE):
        go.recv()
