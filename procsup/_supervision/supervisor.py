"""Supervisor: starts critical tasks in child processes; its Monitor thread watches them.

::

    spawn() / CriticalTaskExecutionHandle(...)          (caller's thread)
      └─ Lifecycle (procsup._supervision.lifecycle: a task across its runs, restarts, timeout)
           └─ _start(): validate (no process is started on bad input), boot the Monitor thread
                └─ launch() (procsup._supervision.launch): token, pipes, start ─▶ Monitor.add()
    shutdown(): cancel root and every task ─▶ wait grace ─▶ escalate (SIGTERM, SIGKILL) ─▶ reap all

Things that don't work
----------------------
- A daemonic ``multiprocessing.Process``: daemonic processes may not start children, which would
  forbid nested critical tasks. Tasks are non-daemonic, and this module's atexit hook (registered
  after multiprocessing's, so run before it) stops them before multiprocessing would join them.
- Fork as the default: forking a process that runs a supervisor thread copies its locks in
  whatever state they are; forkserver (spawn without it) is the default, fork only when asked.
- ``multiprocessing``'s forkserver: ~13 ms a start here, and its preload list is read once,
  process-wide. "forkserver" means procsup's zygote (``procsup._process.zygote``), which imports
  each supervisor's ``preload`` and each task's module on first use, then forks them ready-made.
- Sending the token or args after start (a Queue, a Pipe): tokens pickle only while a process is
  being started (they carry the arena's fd), so everything travels in ``Process(args=...)``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import enum
import functools
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from procsup._os.timeouts import check_timeout
from procsup._process.zygote import import_modules
from procsup._process.zygote import preload as zygote_preload
from procsup._supervision.aio import off_loop
from procsup._supervision.launch import launch
from procsup._supervision.lifecycle import Lifecycle
from procsup._supervision.monitor import KILL_WAIT, REAP_DEADLINE, Monitor, TaskRecord, escalate
from procsup._supervision.options import (
    DEFAULT,
    RestartPolicy,
    TaskOptions,
    check_options,
    check_preload,
)
from procsup._supervision.options import check_task as _validate
from procsup._supervision.signals import SignalBridge
from procsup._supervision.status import EventStream, StatusHub, TaskEvent, TaskSnapshot
from procsup._supervision.timers import Timers
from procsup._token.token import CancellationToken

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from procsup._supervision.handle import CriticalTaskExecutionHandle

__all__ = ["Supervisor", "default_supervisor"]

T = TypeVar("T")

logger = logging.getLogger("procsup")

_OWN_PRELOAD = ("procsup", "procsup._process.entry")  # what the zygote imports for every supervisor


class _Default(enum.Enum):
    """``shutdown()``'s default timeout: the supervisor's ``grace_period`` (None waits forever)."""

    GRACE_PERIOD = "grace_period"

    def __repr__(self) -> str:
        return "GRACE_PERIOD"


GRACE_PERIOD = _Default.GRACE_PERIOD


class Supervisor:
    """Starts critical tasks in child processes and supervises them from one thread.

    Args:
        start_method: "forkserver" (the default where available: procsup's preloaded zygote),
            "spawn" or "fork".
        token: The root token; tasks spawned without a parent are its children. A new root if None.
        preload: Names of modules the zygote (or, under fork, this process) imports once, before
            forking tasks. Each must be found where ``import`` looks (``sys.path``); none is
            imported here.
        grace_period: Seconds ``shutdown()`` gives tasks to honour cancellation before escalating,
            and tasks get after this process dies before they are killed: a finite number >= 0.

    The thread starts with the first task. ``shutdown()`` (also run by ``with`` and at interpreter
    exit) cancels the root and every task, waits, escalates, and reaps everything.

    Raises:
        ValueError: an unknown start method, or a negative, NaN, infinite or None grace period.
        TypeError: ``token`` is not a token, ``grace_period`` not a number, ``preload`` not module
            names.
        ModuleNotFoundError: a ``preload`` module cannot be found (its message names it). One
            that is found but raises when imported makes the first ``spawn()`` raise ImportError.
    """

    def __init__(
        self,
        start_method: str | None = None,
        token: CancellationToken | None = None,
        preload: Iterable[str] = (),
        grace_period: float = 5.0,
    ) -> None:
        methods = multiprocessing.get_all_start_methods()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in methods else "spawn"
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, got {start_method!r}")
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(
                f"token must be a CancellationToken or None, not {type(token).__name__}"
            )
        preload = check_preload(preload)
        grace = check_timeout(grace_period, "grace_period")
        if grace is None:  # the guardian must kill a dead supervisor's tasks at some point
            raise ValueError(f"grace_period must be a finite number of seconds, got {grace_period}")
        self._grace = grace
        self._method = start_method
        self._ctx: BaseContext = multiprocessing.get_context(start_method)
        self._preload = [*_OWN_PRELOAD, *preload]
        self.token = token if token is not None else CancellationToken()
        self._lock = threading.Lock()  # guards _closed and _monitor
        self._closed = False  # set once by shutdown(); no task starts after
        self._monitor: Monitor | None = None  # created with the first task
        self._signals: SignalBridge | None = None  # install_signal_handlers() until shutdown()
        self._pid = os.getpid()  # a forked copy of this object is inert
        self._status = StatusHub()  # live tasks (across restarts) and event subscribers
        _ALL.add(self)

    @property
    def start_method(self) -> str:
        """The multiprocessing start method of this supervisor's tasks."""
        return self._method

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` was called (or the supervision thread died)."""
        return self._closed or (self._monitor is not None and not self._monitor.alive)

    @property
    def grace_period(self) -> float:
        """Seconds ``shutdown()`` waits for tasks to honour cancellation."""
        return self._grace

    @overload
    def spawn(
        self,
        task_fn: Callable[..., Awaitable[T]],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        timeout: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> CriticalTaskExecutionHandle[T]: ...

    @overload
    def spawn(
        self,
        task_fn: Callable[..., T],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        timeout: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> CriticalTaskExecutionHandle[T]: ...

    def spawn(
        self,
        task_fn: Callable[..., Any],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        timeout: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> CriticalTaskExecutionHandle[Any]:
        """Start ``task_fn(token, *args, **kwargs)`` as a critical task; return its handle.

        Args:
            task_fn, description, args, kwargs: As for ``CriticalTaskExecutionHandle``.
            parent_token: Cancelled when the task finally fails; None means this supervisor's
                root token.
            restart: Erlang/OTP policy: "temporary" runs once, a failure cancels the parent;
                "transient" is restarted after a failure or crash, not after a return; "permanent"
                after any end. Each run gets a fresh child token. Restarts stop once the handle
                cancels or stops the task, the parent is cancelled or the supervisor shuts down.
            max_restarts, period: Restart intensity: one restart more than ``max_restarts`` within
                ``period`` seconds cancels the parent with a cause listing the last failures, and
                the task is not run again. ``max_restarts=0`` escalates on the first failure.
            memory_limit: Bytes of private writable memory (heap, anonymous mappings; Linux
                ``RLIMIT_DATA``) the task process may use; None means no limit. Going over it fails
                the allocation: the task fails with "MemoryError: memory limit exceeded ...".
            cpu_time_limit: Seconds of CPU time (rounded up to whole seconds; ``RLIMIT_CPU``); the
                task is then killed by SIGXCPU ("CPU time limit exceeded"). None: no limit.
            timeout: Seconds of wall-clock time per run. The task's token is then cancelled; if it
                has not ended ``grace_period`` seconds later, its tree gets SIGTERM, then SIGKILL,
                and it crashed ("it exceeded its timeout"), which counts as a failure. A task that
                returns after the cancellation returned. None (or ``math.inf``): no limit. 0: no
                time at all, as a wait of 0 polls: each run starts with its token cancelled, and
                the grace period follows. Negative or NaN: ValueError; not a number: TypeError.
            capture_output: Show the task's stdout and stderr on this process's ``sys.stdout`` and
                ``sys.stderr``, line by line, prefixed with ``[description pid]``. Logging records
                are forwarded whatever this says.
            backoff: ``(first, most)`` seconds to wait before a restart: ``first`` doubled for
                each restart within ``period``, at most ``most``, times a random factor in
                [0.5, 1].

        Raises:
            TypeError, ValueError: a bad argument (ValueError for a bad value: a negative limit,
                an unknown policy); no process is started then.
            ImportError: a ``preload`` module raised when imported (the first spawn imports
                them); the message names it and its error, and no process is started.
            RuntimeError: after ``shutdown()``.
        """
        from procsup._supervision.handle import CriticalTaskExecutionHandle

        options = check_options(
            restart, max_restarts, period, backoff, memory_limit, cpu_time_limit, timeout,
            capture_output,
        )  # fmt: skip
        parent = self.token if parent_token is None else parent_token
        return CriticalTaskExecutionHandle._adopt(
            self._launch(task_fn, parent, description, args, kwargs, options)
        )

    async def spawn_async(
        self, task_fn: Callable[..., Any], description: str, **spawn_args: Any
    ) -> CriticalTaskExecutionHandle[Any]:
        """``spawn()`` from a coroutine, without blocking the event loop.

        Starting a process takes milliseconds (the first start of a supervisor, which boots its
        zygote, about 100), so the start runs in the loop's default executor. Takes the same
        arguments and raises the same errors as ``spawn()``. If the awaiting coroutine is cancelled
        meanwhile, the task is still started, then cancelled and detached.
        """
        return await off_loop(functools.partial(self.spawn, task_fn, description, **spawn_args))

    def _launch(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        options: TaskOptions = DEFAULT,
    ) -> Lifecycle:
        life = Lifecycle(self, task_fn, parent, description, args, kwargs, options)
        life.start()
        return life

    def tasks(self) -> list[TaskSnapshot]:
        """Snapshots of every task not finally done (running, or waiting to restart), oldest first.

        Each reads psutil for the task's RSS and CPU use; a task that exits meanwhile shows None.
        """
        return [life.snapshot() for life in self._status.live()]

    def events(self, maxlen: int = 10_000) -> EventStream:
        """Open a stream of lifecycle events of this supervisor's tasks (see ``TaskEvent``).

        Args:
            maxlen: Unread events kept; beyond it the oldest are dropped (``stream.dropped``).
        """
        return self._status.stream(maxlen)

    def on_event(self, callback: Callable[[TaskEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event; return a function removing it.

        The callback runs on the thread that caused the event (the supervision thread for all but
        a first ``started``): keep it short and non-blocking. What it raises is logged and dropped.
        """
        return self._status.add_callback(callback)

    def _timers(self) -> Timers:
        assert self._monitor is not None, "a task has started, so the monitor exists"
        return self._monitor.timers

    # ---------------------------------------------------------------- starting

    def _start(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        options: TaskOptions = DEFAULT,
    ) -> TaskRecord:
        _validate(task_fn, parent, description, args, kwargs, self._method)
        if os.getpid() != self._pid:
            raise RuntimeError("a Supervisor cannot be used in a process forked from its owner")
        with self._lock:
            if self._closed:
                raise RuntimeError("this Supervisor has been shut down")
            monitor = self._monitor
            if monitor is None:
                monitor = self._monitor = self._boot(getattr(task_fn, "__module__", None))
                # Kept alive while it supervises, dropped or not, so that atexit shuts it down.
                _RUNNING.add(self)
        return launch(self, monitor, task_fn, parent, description, args, kwargs, options)

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM cancel this supervisor's root token; a second one shuts down.

        The first signal cancels ``token`` with a cause naming it ("Supervisor received SIGTERM
        (signal 15)"); the program is expected to notice and shut down. A second signal calls
        ``shutdown()`` with a grace of at most one second. The handlers never block: they write
        one byte to a pipe that a "procsup-signals" thread reads. ``shutdown()`` (on the main
        thread) restores the previous handlers. Idempotent.

        Raises:
            RuntimeError: not called from the main thread, or after ``shutdown()``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this Supervisor has been shut down")
            if self._signals is None:
                self._signals = SignalBridge(self, (signal.SIGINT, signal.SIGTERM))

    def _boot(self, task_module: str | None) -> Monitor:
        """Import the preload list where tasks are forked from, then make the Monitor.

        Raises:
            ImportError: a ``preload`` module raised when imported (a module that cannot be found
                was refused by the constructor already); the message names it and its error.
        """
        mine = self._preload[len(_OWN_PRELOAD) :]
        if self._method == "fork":  # forked tasks find these imported; the zygote imports its own
            failed = import_modules([*self._preload, task_module or "__main__"])
            for name, error in failed:
                if name not in mine:  # the task's own module: the task imports it, and fails there
                    logger.warning("procsup could not preload module %r: %s", name, error)
            failed = [(name, error) for name, error in failed if name in mine]
        else:
            failed = zygote_preload(mine) if mine else []
        if failed:
            name, error = failed[0]
            raise ImportError(
                f"Supervisor preload module {name!r} cannot be imported: {error}", name=name
            )
        return Monitor()

    def shutdown(self, timeout: float | _Default | None = GRACE_PERIOD) -> None:
        """Cancel the root token and every task, wait, escalate the stragglers, reap everything.

        Args:
            timeout: Seconds tasks get to honour cancellation before they are sent SIGTERM, then
                (one second later) SIGKILL. By default the supervisor's ``grace_period``; None
                (or ``math.inf``) waits for as long as they take; 0 escalates at once.

        Idempotent. Outcomes stay available on the handles. Tasks killed here raise
        ``TaskCrashedError`` (stopped on request) from ``join()`` and leave their parent alone.

        Raises:
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number; nothing is shut
                down then.
        """
        wait = self._grace if timeout is GRACE_PERIOD else check_timeout(timeout)
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._closed = True
            monitor = self._monitor
            signals = self._signals
        if signals is not None and signals.uninstall():
            self._signals = None
        _RUNNING.discard(self)
        self.token.cancel("Supervisor shut down")
        if monitor is None:
            return
        with monitor.lock:
            tasks = list(monitor.live)
        while tasks:  # again, for any task whose start was under way when we closed
            for task in tasks:
                task.token.cancel("Supervisor shut down")
            futures = [task.future for task in tasks]
            concurrent.futures.wait(futures, wait)
            stragglers = [task for task in tasks if not task.future.done()]
            stuck: list[str] = []
            if stragglers:
                reason = f"it did not honour cancellation within {wait} s of shutdown"
                stuck = escalate(stragglers, reason)
            if not stuck:
                concurrent.futures.wait(futures, REAP_DEADLINE)
            with monitor.lock:
                tasks = [task for task in monitor.live if task.future not in futures]
        # A task that SIGKILL cannot end (D state) was reported; its watch outlives us.
        monitor.close(KILL_WAIT if monitor.live else REAP_DEADLINE)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        live = len(self._monitor.live) if self._monitor is not None else 0
        state = "shut down" if self._closed else f"{live} live tasks"
        return f"<procsup.Supervisor {self._method}, {state}>"


Supervisor.__module__ = "procsup"

_ALL: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_RUNNING: set[Supervisor] = set()  # booted and not shut down yet
_default: Supervisor | None = None
_default_lock = threading.Lock()


def default_supervisor() -> Supervisor:
    """Return the process-wide supervisor (used when ``runtime`` is None); made on first use."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Supervisor()
        return _default


def _shutdown_default(timeout: float | _Default | None = GRACE_PERIOD) -> None:
    """Shut the default supervisor down and forget it (tests use this between cases)."""
    global _default
    with _default_lock:
        sup, _default = _default, None
    if sup is not None:
        sup.shutdown(timeout)


def _shutdown_all() -> None:
    for sup in [*_RUNNING, *_ALL]:
        sup.shutdown()


def _forget_after_fork() -> None:
    # Supervisors' threads do not survive fork; the child starts over with a fresh default.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()
    _ALL.clear()
    _RUNNING.clear()


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
