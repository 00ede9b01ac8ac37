"""A supervisor whose process has an at-fork hook that starts a thread (as some libraries do), for
test_shim: the hook runs in each fork task's shim too.

    python -m tests.atfork_script COUNT

Runs COUNT fork tasks. For each, while the task waits, it checks that the threads the hook
started in its shim have SIGCHLD blocked (a thread that took it would leave the shim waiting);
then lets the task return and checks that the task's result comes back and that the shim exits.
Prints "ok" and exits 0, or names what failed and exits 1.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from procsup import CancellationToken, Supervisor
from tests.conftest import process_gone

DEADLINE = 30.0
_SIGCHLD_BIT = 1 << (17 - 1)  # SigBlk in /proc/PID/task/TID/status is a mask of signals 1..64


def _start_thread() -> None:
    threading.Thread(target=time.sleep, args=(DEADLINE,), daemon=True).start()


def report_shim(token: CancellationToken, ready: CancellationToken) -> int:
    """Return our parent (the shim) once cancelled; ``ready`` tells the supervisor we run."""
    ready.cancel("running")
    token.wait(DEADLINE)
    return os.getppid()


def _masks(pid: int) -> list[int]:
    """The blocked-signal masks of the process's threads but the main one (which, inside
    ``sigtimedwait``, shows the signals it waits for unblocked)."""
    masks = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    masks.append(int(line.split()[1], 16))
    return masks


def main(count: int) -> int:
    os.register_at_fork(after_in_child=_start_thread)
    with Supervisor(start_method="fork", grace_period=0.1) as sup:
        for i in range(count):
            ready = CancellationToken()
            handle = sup.spawn(report_shim, f"task {i}", args=(ready,))
            if not ready.wait(DEADLINE):
                print(f"task {i} did not start")
                return 1
            with open(f"/proc/{handle.pid}/stat") as f:
                shim = int(f.read().rsplit(")", 1)[1].split()[1])
            masks = _masks(shim)
            if not masks or any(not mask & _SIGCHLD_BIT for mask in masks):
                print(f"task {i}: shim {shim} thread masks {[hex(m) for m in masks]}")
                return 1
            handle.cancel()
            if handle.join(DEADLINE) != shim:
                print(f"task {i}: wrong result")
                return 1
            if not process_gone(shim, DEADLINE):
                print(f"task {i}: shim {shim} still there")
                return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
