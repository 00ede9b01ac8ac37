"""The spawn start method: a zygote child that execs a fresh interpreter for its task.

::

    supervisor: ZygoteProcess(fresh=True)          zygote                fresh interpreter
    ────────────────────────────────────           ──────                ─────────────────
    payload = (python + its flags,      ─ spawn ─▶ fork ─▶ exec_fresh(): memfd := (preparation,
      spawn.get_preparation_data(),                         fds, payload); close every other fd;
      pickled (target, args))                               execve(python -c "...fresh_main(memfd)")
                                                                 ──▶ fresh_main(): spawn.prepare()
                                                                     (sys.path, cwd, __mp_main__),
                                                                     unpickle, target(*args), _exit

The zygote stays the task's parent (a subreaper and the guardian), so spawn tasks are contained as
forkserver ones are; the fds the task's pickle refers to keep their numbers across ``execve``.

Things that don't work
----------------------
- ``multiprocessing``'s spawn ``Process``: the task's parent is then the user's process, which is
  no subreaper, so a crashed task's ``setsid()`` descendants reparent to init and escape.
- Pickling the preparation data as it is: ``authkey`` is an ``AuthenticationString``, which refuses
  to pickle outside a process start; it travels as bytes and ``prepare()`` wraps it again.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

from procsup._os import proc as _platform
from procsup._process.zygote import inherited, run_target

__all__ = ["exec_fresh", "fresh_main"]

_FRESH_MAIN = (
    "import sys; sys.path[:0] = sys.argv[2:]; "
    "import procsup._process.spawned as s; s.fresh_main(int(sys.argv[1]))"
)


def exec_fresh(payload: bytes, fds: list[int]) -> None:
    """In a zygote child, for the spawn start method: exec a fresh interpreter that runs
    ``fresh_main``, keeping only stdio, the task's fds (same numbers) and a memfd with the rest."""
    command, env, preparation, payload = pickle.loads(payload)  # the interpreter and its flags
    memfd = os.memfd_create("procsup-spawn", 0)
    os.write(memfd, pickle.dumps((preparation, fds, payload), pickle.HIGHEST_PROTOCOL))
    os.lseek(memfd, 0, os.SEEK_SET)
    keep = {memfd, *fds}
    for fd in keep:
        os.set_inheritable(fd, True)
    _platform.close_fds_except(keep)
    argv = [*command, "-c", _FRESH_MAIN, str(memfd), *preparation.get("sys_path", [])]
    try:
        os.execve(command[0], argv, env)
    except OSError as exc:
        print(f"procsup: cannot start {command[0]!r} for a spawn task: {exc}", file=sys.stderr)
        raise


def fresh_main(fd: int) -> None:
    """A spawn task's interpreter: prepare as multiprocessing's spawn does (``sys.path``, working
    directory, the main module as ``__mp_main__``), then run the task and ``_exit``."""
    with open(fd, "rb") as f:
        preparation, fds, payload = pickle.load(f)
    code = 1
    try:
        inherited[:] = fds
        code = run_target(_prepare_and_run, (preparation, payload))
    finally:
        os._exit(code)


def _prepare_and_run(preparation: dict[str, Any], payload: bytes) -> None:
    import multiprocessing.process
    import multiprocessing.spawn

    process = multiprocessing.process.current_process()
    process._inheriting = True  # type: ignore[attr-defined]
    try:
        multiprocessing.spawn.prepare(preparation)
        target, args = pickle.loads(payload)
    finally:
        del process._inheriting  # type: ignore[attr-defined]
    del payload
    target(*args)
