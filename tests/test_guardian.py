"""The zygote as guardian of a dead supervisor's tasks (``procsup._process.guardian``): it stops
them on the one escalation ladder, cancel, grace, SIGTERM, SIGKILL, as ``stop()`` does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import process_gone
from tests.guardian_tasks import DEADLINE

ROOT = Path(__file__).resolve().parent.parent


def _next(reader: Connection) -> Any:
    assert reader.poll(DEADLINE), "no message in time"
    return reader.recv()


def test_a_dead_supervisors_task_is_cancelled_then_sigtermed_before_sigkill(
    start_method: str, report_pipe: tuple[Connection, int]
) -> None:
    """Test that when its supervisor is SIGKILLed, a task that ignores cancellation gets SIGTERM
    after the grace period, its token cancelled by then, and may exit on it (not SIGKILLed
    first); and that its descendant, which ignores SIGTERM, is killed all the same."""
    reader, fd = report_pipe
    script = subprocess.Popen(
        [sys.executable, "-m", "tests.guardian_tasks", start_method, "0.2", str(fd)],
        pass_fds=(fd,),
        cwd=ROOT,
    )
    os.close(fd)  # the script and its task hold it now
    try:
        ready, spawned = sorted([_next(reader), _next(reader)])  # in either order
        assert spawned == ("spawned",)
        kind, pid, descendant = ready
        assert kind == "ready"
        script.kill()
        assert script.wait(DEADLINE) == -signal.SIGKILL
        ending = _next(reader)
    finally:
        script.kill()
        script.wait(DEADLINE)
    leftovers = {pid, descendant}
    try:
        kind, cancelled, cause = ending
        assert kind == "terminated"
        assert cancelled
        assert f"the supervisor process (pid {script.pid}) died" in cause
        for gone in (pid, descendant):
            assert process_gone(gone, DEADLINE)
            leftovers.discard(gone)
    finally:
        for leftover in leftovers:  # only on failure: a pid seen gone may be a stranger's now
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(leftover).kill()
