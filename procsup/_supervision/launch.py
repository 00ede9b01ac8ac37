"""Starting one run of a task on this machine: its pipes, its process, and the thread watching it.

::

    LocalBackend.start(spec) ─ validate, boot the Monitor ─▶ launch(config, monitor, spec):
        result pipe, stderr pipe (procsup._process.stdio), log socket and captured stdout
        (procsup._process.setup)
        _process(...).start(): a process running entry.main(Prepared(fn, setup), args, kwargs,
                               result writer, token, stderr writer)
            forkserver: a ZygoteProcess (procsup's preloaded zygote forks it)
            spawn: a ZygoteProcess too (the zygote forks, the child execs a fresh interpreter)
            fork: a ForkProcess (os.fork() here makes a shim, which forks the task)
            the call is pickled by reference, or by value where it must be (lambdas, closures,
            __main__: procsup._process.reduction); nothing is pickled under fork
            a pickle that fails ─▶ TypeError naming the task and the piece that fails alone
        close our copies of the child's ends (the zygote keeps its own until the task is
        reaped: ``held``); fork tasks: the zygote guards their shim too
        TaskRecord ─▶ Monitor.add()  (procsup._supervision.monitor)

The run's token (``spec.token``) is made by the caller before the start (seed C3/C4: a task whose
parent is already cancelled starts cancelled).

Things that don't work
----------------------
- Letting the task's exit close the last write end of its pipes to us (result, stderr, logs),
  as every start method once did: each close woke the supervision thread (an EOF: three wake-ups
  a death) while the dying task still had its exit to finish, and on a busy machine, with both on
  one CPU, each wake-up preempted it: ~100 us more before the zygote could report the death
  (ftrace, SIGKILL to the parent's wake-up). Nothing waits for those EOFs (a grandchild may hold
  any of these pipes), so the zygote keeps its copies of the write ends (``held``) until it has
  written the task's status, and the death wakes the thread once. Holding them here instead
  costs the supervisor three fds a live task (4 to 7); in the zygote, 1 to 4, no more than here.
  A fork task's ends are not held (its exit closes them, as before).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

from procsup._os import tree
from procsup._os.proc import enlarge_pipe
from procsup._process import entry
from procsup._process.reduction import UnpicklableError, by_value, culprit, home_module
from procsup._process.setup import Prepared, open_channels
from procsup._process.stdio import StderrTap
from procsup._process.zygote import ForkProcess, ZygoteProcess, guard, uninterrupted
from procsup._supervision.monitor import Monitor, TaskRecord
from procsup._supervision.runtime import RunSpec
from procsup._token.token import CancellationToken

__all__ = ["LocalConfig", "launch"]

logger = logging.getLogger("procsup")


@dataclass(frozen=True)
class LocalConfig:
    """What starting a local run needs of its supervisor; every field already validated.

    Attributes:
        start_method: "forkserver" (procsup's zygote), "spawn" or "fork".
        preload: Modules imported where tasks are forked from: procsup's own, then the user's.
        grace: Seconds a task gets after its supervisor dies before the guardian stops it.
    """

    start_method: str
    preload: tuple[str, ...]
    grace: float


def launch(config: LocalConfig, monitor: Monitor, spec: RunSpec) -> TaskRecord:
    """Start one run of a validated task and let ``monitor`` watch it."""
    description, options = spec.description, spec.options
    reader, writer = multiprocessing.Pipe(duplex=False)
    enlarge_pipe(writer.fileno())
    setup, channels, stderr_printer = open_channels(
        description,
        capture_output=options.capture_output,
        memory_limit=options.memory_limit,
        cpu_time_limit=options.cpu_time_limit,
    )
    stderr = StderrTap()
    if stderr_printer is not None:
        stderr.forward, stderr.finish = stderr_printer.write, stderr_printer.close
    # The token goes last: if args fail to pickle, it was never handed to a child.
    target = Prepared(spec.task_fn, setup)
    # The write ends of the child's pipes to us, which the zygote holds until the task is reaped.
    assert stderr.child_end is not None  # until the start
    held = [writer.fileno(), stderr.child_end.fileno(), setup.log.fileno()]
    if setup.stdout is not None:
        held.append(setup.stdout.fileno())
    proc = _process(
        config,
        spec,
        (target, tuple(spec.args), dict(spec.kwargs), writer, spec.token, stderr.child_end),
        held,
    )

    def discard() -> None:  # the task's process (if any) killed and reaped, every fd closed
        if proc.pid is not None:
            tree.kill_tree(proc.pid)
            proc.join()
        proc.close()  # fork: the shim, if one is left, is killed with what it holds
        for end in (reader, writer, stderr, setup, *channels):
            end.close()

    try:
        proc.start()
    except BaseException as exc:
        uninterrupted(discard)
        if isinstance(exc, UnpicklableError):
            value = isinstance(proc, ZygoteProcess) and proc.by_value
            error, cause = _unpicklable(config, spec, value, exc)
            raise error from cause
        raise
    try:  # until the supervision thread has it, a Ctrl-C here must not leave the task running
        writer.close()  # so the child holds the only write end we know of (and the zygote)
        stderr.close_child_end()
        setup.close()
        os.set_blocking(reader.fileno(), False)
        if isinstance(proc, ForkProcess):  # the zygote watches its shim
            _guard(config, proc, spec.token)
        task = TaskRecord(spec, proc, reader, proc.sentinel)
        task.stderr = stderr
        stderr.pid = task.pid
        if stderr_printer is not None:
            stderr_printer.pid = task.pid
        task.channels = [*channels, stderr]
        for channel in channels:
            channel.pid = task.pid
        added = monitor.add(task)
    except BaseException:
        uninterrupted(discard)
        raise
    if not added:  # shutdown() finished while we were starting: undo
        uninterrupted(discard)
        raise RuntimeError("this Supervisor has been shut down")
    return task


def _process(
    config: LocalConfig, spec: RunSpec, args: tuple[Any, ...], held: list[int]
) -> ForkProcess | ZygoteProcess:
    """A not yet started process that will run ``entry.main(*args)``; ``held``: fds among
    ``args`` that the zygote keeps open until it has reaped the task."""
    name = f"procsup: {spec.description}"
    # For the zygote: the token it cancels if we die, the grace it gives, the task's stderr pipe.
    token, stderr, grace = args[4], args[5].fileno(), config.grace
    # An async task needs asyncio, which ``import procsup`` leaves out (procsup._supervision.aio):
    # have it imported where tasks are forked from, once, rather than in every task.
    needs = ["asyncio"] if inspect.iscoroutinefunction(spec.task_fn) else []
    if config.start_method == "fork":  # nothing is pickled: the child is a copy
        for needed in needs:
            importlib.import_module(needed)
        return ForkProcess(entry.main, args, name, grace=grace)
    # Decided before pickling, from a look at the call (procsup._process.reduction).
    value = by_value(spec.task_fn, spec.args, spec.kwargs)
    if config.start_method == "spawn":  # the zygote forks and execs a fresh interpreter
        return ZygoteProcess(
            entry.main,
            args,
            name,
            fresh=True,
            token=token,
            grace=grace,
            stderr=stderr,
            by_value=value,
            held=held,
        )
    preload = [*config.preload, *needs]
    if value:  # a by-value payload names cloudpickle's helpers: import them once, there
        preload.append("cloudpickle")
    return ZygoteProcess(
        entry.main,
        args,
        name,
        preload=preload,
        token=token,
        grace=grace,
        stderr=stderr,
        by_value=value,
        held=held,
        module=home_module(spec.task_fn),  # never __main__: that is the zygote's own
    )


def _unpicklable(
    config: LocalConfig, spec: RunSpec, value: bool, exc: UnpicklableError
) -> tuple[TypeError, Exception]:
    """The TypeError for a call that could not be pickled, and its cause: it names the task and,
    if one piece fails alone, that piece and why."""
    cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    what, hint = "its function, args or kwargs", ""
    found = culprit(spec.task_fn, spec.args, spec.kwargs, value)
    if found is not None:
        what, cause, fixable = found
        if fixable:  # deep inside an argument, out of by_value()'s sight
            hint = "; it would pickle by value: pass the call as a lambda or closure to send it so"
    how = ", not even by value (cloudpickle)," if value else ""
    error = TypeError(
        f"critical task {spec.description!r} could not be started: {what} cannot be pickled"
        f"{how} under the {config.start_method!r} start method "
        f"({type(cause).__name__}: {cause}){hint}"
    )
    return error, cause


def _guard(config: LocalConfig, proc: ForkProcess, token: CancellationToken) -> None:
    """Make the zygote the guardian of a fork task (``procsup._process.guardian``)."""
    try:
        guard(proc, token, config.grace)
    except (OSError, RuntimeError) as exc:
        logger.warning(
            "procsup zygote unavailable: task pid %d will not be killed if this process dies (%s)",
            proc.pid,
            exc,
        )
