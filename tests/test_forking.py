"""Forks without CPython's fork handling where a child needs none (``procsup._os.forking``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from procsup import Supervisor
from procsup._os.forking import RECORDER
from tests import forking_tasks, tasks
from tests.tasks import DEADLINE

ROOT = Path(__file__).resolve().parents[1]

# Run after RECORDER, as the zygote runs: fork through Hooks, once with a thread running too,
# and print what each child saw of the hooks.
_FORKS = textwrap.dedent(
    """
    import threading
    import procsup._process.server
    from procsup._os.forking import Hooks
    ran = []
    os.register_at_fork(after_in_child=lambda: ran.append("mine"))
    forks = Hooks(hooks, early)
    print("fast", forks.fast)

    def fork_and_report(label):
        lock = threading._active_limbo_lock  # threading's hook replaces it in a child
        read, write = os.pipe()
        pid = forks.fork()
        if pid == 0:
            os.write(write, repr((ran, threading._active_limbo_lock is lock)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(label, os.read(read, 1000).decode())

    fork_and_report("alone")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    fork_and_report("threaded")
    stop.set()
    thread.join()
    """
)


def test_the_zygote_forks_without_lock_repairs_and_replays_the_other_hooks() -> None:
    """Test that, in a process started as the zygote is, Hooks.fork skips threading's at-fork
    hook while the process has one thread, runs a hook registered after the recorder, and falls
    back to os.fork() (threading's hook too) once another thread runs."""
    out = subprocess.run(
        [sys.executable, "-c", RECORDER + _FORKS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "fast True",
        "alone (['mine'], True)",
        "threaded (['mine'], False)",
    ]


def test_hooks_a_task_module_registers_in_the_zygote_run_in_every_task() -> None:
    """Test that an at-fork hook registered by a task's module, preloaded by the zygote, runs in
    each task it forks (a spare forked before the preload is not used), and that random is
    reseeded in each (no two tasks draw alike)."""
    with Supervisor() as sup:  # the zygote has a spare by now, or soon
        assert sup.spawn(tasks.return_value, "warm-up", args=(1,)).join(DEADLINE) == 1
    with Supervisor(preload=["tests.forking_tasks"]) as sup:
        ran = [sup.spawn(forking_tasks.hook_ran_here, "hook").join(DEADLINE) for _ in range(5)]
        bits = [sup.spawn(forking_tasks.random_bits, "bits").join(DEADLINE) for _ in range(5)]
    assert ran == [True] * 5
    assert len(set(bits)) == 5


def test_a_fork_task_is_the_shims_copy_after_the_hooks_ran_in_the_shim() -> None:
    """Test that under fork the at-fork hooks run in the shim, which the task is a copy of: the
    hook saw the shim's pid, not the task's; and each task still draws its own random numbers."""
    with Supervisor(start_method="fork") as sup:
        ran = [sup.spawn(forking_tasks.hook_ran_here, "hook").join(DEADLINE) for _ in range(3)]
        bits = [sup.spawn(forking_tasks.random_bits, "bits").join(DEADLINE) for _ in range(5)]
    assert ran == [False] * 3
    assert len(set(bits)) == 5
