"""A task for the guardian tests, and the supervisor process that runs it for the test to kill.

    python -m tests.guardian_tasks START_METHOD GRACE FD

FD is the write end of a pipe the test reads. The script starts ``report_sigterm`` with it, says
("spawned",) once the start returned (a fork task's guard is sent by then), then blocks until
SIGKILLed: the zygote, its guardian, must then stop the task as ``stop()`` would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from types import FrameType

from procsup import CancellationToken, Supervisor

DEADLINE = 30.0
OUTLIVE = 3 * DEADLINE  # a descendant sleeps longer than any test waits: only a kill ends it


def _stubborn_descendant() -> int:
    """Fork a child in a session of its own that ignores SIGTERM and sleeps; return its pid once
    it ignores SIGTERM."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setsid()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.close(write_end)  # the handshake: EOF for the parent
            time.sleep(OUTLIVE)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        f.read()
    return pid


def report_sigterm(token: CancellationToken, report: Connection) -> None:
    """Ignore cancellation; on SIGTERM, report whether the token was cancelled by then and its
    cause, then exit 0. Leaves a descendant that ignores SIGTERM; reports ("ready", our pid, its
    pid) once the handler is in place."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        report.send(("terminated", token.is_cancelled(), token.cause))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    descendant = _stubborn_descendant()
    report.send(("ready", os.getpid(), descendant))
    time.sleep(DEADLINE)  # block until signalled


def main(argv: list[str]) -> int:
    # Run as ``-m``, this module is ``__main__``; the task must be named by its importable name.
    from tests import guardian_tasks

    method, grace, fd = argv[0], float(argv[1]), int(argv[2])
    report = Connection(fd, readable=False)
    sup = Supervisor(start_method=method, grace_period=grace)
    sup.spawn(guardian_tasks.report_sigterm, "stubborn", args=(report,)).detach()
    report.send(("spawned",))
    time.sleep(DEADLINE)  # block forever: the test SIGKILLs us
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
