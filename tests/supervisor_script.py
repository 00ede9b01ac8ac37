"""A supervisor process for the tests to kill, signal or let exit.

    python -m tests.supervisor_script SCENARIO START_METHOD GRACE FD

FD is the write end of a pipe the test reads: the tasks (and the script) report on it.

- ``die``: two tasks, one honouring cancellation and one not, then sleep until SIGKILLed.
- ``exit``: a task that ignores cancellation, detached; once it runs, the interpreter exits
  normally.
- ``signals``: ``install_signal_handlers()``, a task ignoring cancellation, then wait for the root
  token (first signal) and for the task's outcome (the second signal shuts down).
"""

from __future__ import annotations

import sys
import time
from multiprocessing.connection import Connection

from procsup import CancellationToken, Supervisor, TaskCrashedError
from tests import contain_tasks

DEADLINE = 30.0


def main(argv: list[str]) -> int:
    scenario, method, grace, fd = argv[0], argv[1], float(argv[2]), int(argv[3])
    report = Connection(fd, readable=False)
    sup = Supervisor(start_method=method, grace_period=grace)
    task = contain_tasks.report_cancel_then_hang
    if scenario == "die":
        sup.spawn(task, "honours", args=(report, True)).detach()
        sup.spawn(task, "ignores", args=(report, False)).detach()
        time.sleep(DEADLINE)  # block forever: the test SIGKILLs us
        return 1
    if scenario == "exit":
        started = CancellationToken()
        sup.spawn(task, "ignores", args=(report, False, started)).detach()
        # Exit once the task runs (a spawn task may take longer to start than the grace period).
        return 0 if started.wait(DEADLINE) else 1  # atexit shuts the supervisor down
    sup.install_signal_handlers()
    handle = sup.spawn(task, "ignores", args=(report, False))
    if not sup.token.wait(DEADLINE):
        return 1
    report.send(("root", sup.token.cause))
    try:
        handle.join(DEADLINE)
    except TaskCrashedError as exc:
        report.send(("joined", str(exc), exc.stopped))
    sup.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
