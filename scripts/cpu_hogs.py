"""Keep CPUs busy beside something else: the load the suite must pass under (``make test-load``).

    python scripts/cpu_hogs.py                 # two hogs until killed (SIGTERM, SIGINT)
    python scripts/cpu_hogs.py -n 3 -t 60      # three hogs, for at most 60 s

Each hog is a child process spinning in pure Python. They never outlive this script: it kills them
on SIGTERM, SIGINT or its own exit, each one also dies with it if it is SIGKILLed
(``PR_SET_PDEATHSIG``), and all of them stop after ``--timeout`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import time
from types import FrameType

_PR_SET_PDEATHSIG = 1
DEFAULT_TIMEOUT = 3600.0  # a safety net: a forgotten hog stops by itself within the hour


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies (Linux; best effort elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(0)


def _spin(parent: int, until: float) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    count = 0
    while True:
        count += 1
        if count % 1_000_000 == 0 and time.monotonic() > until:
            os._exit(0)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Start the hogs, wait until told to stop (or the timeout), kill and reap them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--hogs", type=int, default=2, help="how many (default: 2)")
    parser.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"stop after this many seconds (default: {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    until = time.monotonic() + args.timeout
    me, hogs = os.getpid(), []
    try:
        for _ in range(args.hogs):
            pid = os.fork()
            if pid == 0:
                try:
                    _spin(me, until)
                finally:
                    os._exit(0)
            hogs.append(pid)
        print(f"cpu_hogs: {len(hogs)} hogs running (pids {hogs})", file=sys.stderr, flush=True)
        remaining = until - time.monotonic()
        while remaining > 0:  # a sleep is the whole job here: wait for a signal or the timeout
            time.sleep(remaining)
            remaining = until - time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        for pid in hogs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in hogs:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
