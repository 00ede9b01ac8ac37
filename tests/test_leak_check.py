"""The autouse leak check itself (tests/conftest.py): it must see every task left running."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection

import psutil

from procsup import Supervisor
from tests import tasks
from tests.conftest import helper_pids, leaks, snapshot, wait_for_no_leaks
from tests.tasks import DEADLINE

Pipe = Callable[[], tuple[Connection, Connection]]


def test_leak_check_sees_a_task_left_running(start_method: str, pipe: Pipe) -> None:
    """Test that a task left running fails the leak check whatever forked it (the zygote's tasks
    share its command line), and that once it is stopped the check passes: the zygote and its
    spare, replaced by the start, are told apart by pid."""
    reader, writer = pipe()  # before the snapshot: the pipe outlives the task
    sup = Supervisor(start_method=start_method, grace_period=0.5)
    try:
        # The zygote, its spare and the supervision thread exist before the snapshot.
        assert sup.spawn(tasks.return_value, "warm-up", args=(1,)).join(DEADLINE) == 1
        before = snapshot()
        h = sup.spawn(tasks.wait_for_cancel, "left running", args=(writer,))
        try:
            assert reader.poll(DEADLINE)
            assert reader.recv() == "ready"
            problems = leaks(before, snapshot())
            print("\n".join(problems))  # shown with -s: what a leaking test fails with
            assert h.pid not in helper_pids()
            left = [p for p in problems if p.startswith("processes left running: ")]
            assert len(left) == 1
            assert f"'{h.pid} (" in left[0]
            if start_method == "forkserver":
                # What the old check skipped by command line: a task forked by the zygote.
                assert "procsup._process.server" in " ".join(psutil.Process(h.pid).cmdline())
        finally:
            assert h.stop(DEADLINE) == "cancelled"
        assert wait_for_no_leaks(before, DEADLINE) == []
    finally:
        sup.shutdown()
