"""Starting one run of a task: its pipes, its process, and handing it to the supervision thread.

::

    Supervisor._start() ─ validate, boot the Monitor ─▶ launch():
        token = parent.child_token()                 (before the start: seed C3/C4; born
                                                     cancelled if timeout=0)
        result pipe, stderr pipe (procsup._process.stdio), log socket and captured stdout
        (procsup._process.setup)
        _process(...).start(): a process running _task.main(Prepared(fn, setup), args, kwargs,
                               result writer, token, stderr writer)
            forkserver: a ZygoteProcess (procsup's preloaded zygote forks it)
            spawn: a ZygoteProcess too (the zygote forks, the child execs a fresh interpreter)
            fork: a ForkProcess (os.fork() here makes a shim, which forks the task)
        close our copies of the child's ends; fork tasks: the zygote guards their shim too
        TaskRecord ─▶ Monitor.add()  (procsup._supervision.monitor)
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from procsup._os import proc as _platform
from procsup._process import entry as _task
from procsup._process.setup import Prepared, open_channels
from procsup._process.stdio import StderrTap
from procsup._process.zygote import ForkProcess, ZygoteProcess, guard, uninterrupted
from procsup._supervision.monitor import Monitor, TaskRecord
from procsup._supervision.options import TaskOptions
from procsup._token.token import CancellationToken

if TYPE_CHECKING:
    from procsup._supervision.supervisor import Supervisor

__all__ = ["launch"]

logger = logging.getLogger("procsup")


def launch(
    sup: Supervisor,
    monitor: Monitor,
    task_fn: Callable[..., Any],
    parent: CancellationToken,
    description: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None,
    options: TaskOptions,
) -> TaskRecord:
    """Start one run of a validated task under ``sup`` and let ``monitor`` watch it."""
    token = parent.child_token()
    if options.timeout == 0:  # no time at all, as a wait of 0 polls: born timed out
        token.cancel(f"Critical task '{description}' timed out after 0 s")
    reader, writer = sup._ctx.Pipe(duplex=False)
    _platform.enlarge_pipe(writer.fileno())
    setup, channels, stderr_printer = open_channels(
        description,
        capture_output=options.capture_output,
        memory_limit=options.memory_limit,
        cpu_time_limit=options.cpu_time_limit,
    )
    target = Prepared(task_fn, setup)
    stderr = StderrTap()
    if stderr_printer is not None:
        stderr.forward, stderr.finish = stderr_printer.write, stderr_printer.close
    # The token goes last: if args fail to pickle, it was never handed to a child.
    proc = _process(
        sup,
        task_fn,
        description,
        (target, tuple(args), dict(kwargs or {}), writer, token, stderr.child_end),
    )

    def discard() -> None:  # the task's process (if any) killed and reaped, every fd closed
        if proc.pid is not None:
            _platform.signal_tree(proc.pid, signal.SIGKILL)
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
                f"and kwargs must be picklable under the {sup._method!r} start method ({exc})"
            ) from exc
        raise
    try:  # until the supervision thread has it, a Ctrl-C here must not leave the task running
        writer.close()  # so the child holds the only write end we know of
        stderr.close_child_end()
        setup.close()
        os.set_blocking(reader.fileno(), False)
        if sup._method == "fork":  # the zygote watches its shim
            _guard(sup, proc, token)
        task = TaskRecord(description, proc, token, parent, reader, proc.sentinel)
        task.stderr = stderr
        stderr.pid = task.pid
        if stderr_printer is not None:
            stderr_printer.pid = task.pid
        task.cancels_parent = not options.restarts
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
    sup: Supervisor, task_fn: Callable[..., Any], description: str, args: tuple[Any, ...]
) -> Any:
    """A not yet started process that will run ``_task.main(*args)``."""
    name = f"procsup: {description}"
    # For the zygote: the token it cancels if we die, the grace it gives, the task's stderr pipe.
    guarded = {"token": args[4], "grace": sup._grace, "stderr": args[5].fileno()}
    # An async task needs asyncio, which ``import procsup`` leaves out (procsup._supervision.aio):
    # have it imported where tasks are forked from, once, rather than in every task.
    needs = ["asyncio"] if inspect.iscoroutinefunction(task_fn) else []
    if sup._method == "fork":
        for needed in needs:
            importlib.import_module(needed)
        return ForkProcess(_task.main, args, name, grace=sup._grace)
    if sup._method == "spawn":  # the zygote forks and execs a fresh interpreter
        return ZygoteProcess(_task.main, args, name, fresh=True, **guarded)
    module = getattr(task_fn, "__module__", None)
    preload = [*sup._preload, *needs]
    if module not in (None, "__main__"):
        preload.append(module)
    return ZygoteProcess(_task.main, args, name, preload=preload, **guarded)


def _guard(sup: Supervisor, proc: ForkProcess, token: CancellationToken) -> None:
    """Make the zygote the guardian of a fork task (``procsup._process.guardian``)."""
    try:
        guard(proc, token, sup._grace)
    except (OSError, RuntimeError) as exc:
        logger.warning(
            "procsup zygote unavailable: task pid %d will not be killed if this process dies (%s)",
            proc.pid,
            exc,
        )
