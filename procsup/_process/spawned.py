"""The spawn start method: a zygote child that execs a fresh interpreter for its task.

::

    supervisor: ZygoteProcess(fresh=True)          zygote                fresh interpreter
    ────────────────────────────────────           ──────                ─────────────────
    payload = FreshStart(python + its   ─ Spawn ─▶ fork ─▶ exec_fresh(): memfd := FreshHandoff(
      flags, environment,                                   preparation, fds, payload); close
      spawn.get_preparation_data(),                         every other fd; execve(python -c
      pickled (target, args))                               "...fresh_main(memfd)")
                                                                 ──▶ fresh_main(): spawn.prepare()
                                                                     (sys.path, cwd, __mp_main__),
                                                                     load_payload, target(*args),
                                                                     _exit

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

from procsup._os.fds import close_fds_except, write_all
from procsup._process.messages import FreshHandoff, FreshStart, load_payload
from procsup._process.zygote import run_target

__all__ = ["exec_fresh", "fresh_main"]

_FRESH_MAIN = (
    "import sys; sys.path[:0] = sys.argv[2:]; "
    "import procsup._process.spawned as s; s.fresh_main(int(sys.argv[1]))"
)


def exec_fresh(payload: bytes, fds: list[int]) -> None:
    """In a zygote child, for the spawn start method: exec a fresh interpreter that runs
    ``fresh_main``, keeping only stdio, the task's fds (same numbers) and a memfd with the rest.
    ``payload``: a pickled ``FreshStart``."""
    start: FreshStart = pickle.loads(payload)
    memfd = os.memfd_create("procsup-spawn", 0)
    handoff = FreshHandoff(start.preparation, fds, start.payload)
    write_all(memfd, pickle.dumps(handoff, pickle.HIGHEST_PROTOCOL))
    os.lseek(memfd, 0, os.SEEK_SET)
    keep = {memfd, *fds}
    for fd in keep:
        os.set_inheritable(fd, True)
    close_fds_except(keep)
    command = start.command  # the interpreter and its flags
    argv = [*command, "-c", _FRESH_MAIN, str(memfd), *start.preparation.get("sys_path", [])]
    try:
        os.execve(command[0], argv, start.env)
    except OSError as exc:
        print(f"procsup: cannot start {command[0]!r} for a spawn task: {exc}", file=sys.stderr)
        raise


def fresh_main(fd: int) -> None:
    """A spawn task's interpreter: prepare as multiprocessing's spawn does (``sys.path``, working
    directory, the main module as ``__mp_main__``), then run the task and ``_exit``."""
    code = 1
    try:
        code = run_target(_prepare_and_run, (fd,))
    finally:
        os._exit(code)


def _prepare_and_run(fd: int) -> None:
    import multiprocessing.process
    import multiprocessing.spawn

    with open(fd, "rb") as f:
        handoff: FreshHandoff = pickle.load(f)
    process = multiprocessing.process.current_process()
    process._inheriting = True  # type: ignore[attr-defined]
    try:
        multiprocessing.spawn.prepare(handoff.preparation)
        target, args = load_payload(handoff.payload, handoff.fds)
    finally:
        del process._inheriting  # type: ignore[attr-defined]
    del handoff  # the payload's bytes: the task may need the memory
    target(*args)
