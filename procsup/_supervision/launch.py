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
        close our copies of the child's ends; fork tasks: the zygote guards their shim too
        TaskRecord ─▶ Monitor.add()  (procsup._supervision.monitor)

The run's token (``spec.token``) is made by the caller before the start (seed C3/C4: a task whose
parent is already cancelled starts cancelled).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procsup._os import tree
from procsup._os.proc import enlarge_pipe
from procsup._process import entry
from procsup._process.setup import Prepared, open_channels
from procsup._process.stdio import StderrTap
from procsup._process.zygote import ForkProcess, ZygoteProcess, guard, uninterrupted
from procsup._supervision.monitor import Monitor, TaskRecord
from procsup._supervision.runtime import RunSpec
from procsup._token.token import CancellationToken

__all__ = ["LocalConfig", "check_importable", "launch"]

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


def check_importable(task_fn: Callable[..., Any], description: str, method: str) -> None:
    """Under spawn and forkserver, ``task_fn`` travels by reference: TypeError if it cannot."""
    if method == "fork":
        return
    qualname = getattr(task_fn, "__qualname__", "")
    problem = None
    if "<lambda>" in qualname or "<locals>" in qualname:
        problem = f"{qualname} is a lambda or a closure"
    else:
        try:
            pickle.dumps(task_fn)
        except Exception as exc:  # noqa: BLE001 - any pickling failure gets the same advice
            problem = f"it cannot be pickled ({exc})"
    if problem:
        raise TypeError(
            f"task_fn for critical task {description!r} must be importable under the "
            f"{method!r} start method, i.e. defined at module level: {problem}"
        )


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
    proc = _process(
        config,
        spec.task_fn,
        description,
        (target, tuple(spec.args), dict(spec.kwargs), writer, spec.token, stderr.child_end),
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
        if isinstance(exc, pickle.PicklingError | TypeError | AttributeError):
            raise TypeError(
                f"critical task {description!r} could not be started: its function, args "
                f"and kwargs must be picklable under the {config.start_method!r} start method "
                f"({exc})"
            ) from exc
        raise
    try:  # until the supervision thread has it, a Ctrl-C here must not leave the task running
        writer.close()  # so the child holds the only write end we know of
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
    config: LocalConfig, task_fn: Callable[..., Any], description: str, args: tuple[Any, ...]
) -> ForkProcess | ZygoteProcess:
    """A not yet started process that will run ``entry.main(*args)``."""
    name = f"procsup: {description}"
    # For the zygote: the token it cancels if we die, the grace it gives, the task's stderr pipe.
    token, stderr, grace = args[4], args[5].fileno(), config.grace
    # An async task needs asyncio, which ``import procsup`` leaves out (procsup._supervision.aio):
    # have it imported where tasks are forked from, once, rather than in every task.
    needs = ["asyncio"] if inspect.iscoroutinefunction(task_fn) else []
    if config.start_method == "fork":
        for needed in needs:
            importlib.import_module(needed)
        return ForkProcess(entry.main, args, name, grace=grace)
    if config.start_method == "spawn":  # the zygote forks and execs a fresh interpreter
        return ZygoteProcess(
            entry.main, args, name, fresh=True, token=token, grace=grace, stderr=stderr
        )
    module = getattr(task_fn, "__module__", None)
    preload = [*config.preload, *needs]
    if module not in (None, "__main__"):
        preload.append(module)
    return ZygoteProcess(
        entry.main, args, name, preload=preload, token=token, grace=grace, stderr=stderr
    )


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
