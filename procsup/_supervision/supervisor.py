"""Supervisor: starts critical tasks in child processes; its Monitor thread watches them.

::

    spawn() / CriticalTaskExecutionHandle(...)          (caller's thread)
      └─ validate (no process is started on bad input)
           └─ Lifecycle (procsup._supervision.lifecycle: a task across its runs, restarts, timeout)
                └─ LocalBackend.start(RunSpec) (procsup._supervision.local, the runtime seam):
                     first start: preload, the Monitor thread; launch(): pipes, process, watch
    shutdown(): close the backend ─▶ cancel root ─▶ the ladder for every live run (cancel,
                grace, SIGTERM, SIGKILL: procsup._os.tree.Ladder) ─▶ reap all ─▶ join the thread

Things that don't work
----------------------
- A daemonic ``multiprocessing.Process``: daemonic processes may not start children, which would
  forbid nested critical tasks. Tasks are non-daemonic, and this module's atexit hook (registered
  after multiprocessing's, so run before it) stops them before multiprocessing would join them.
- Fork as the default: forking a process that runs a supervisor thread copies its locks in
  whatever state they are; forkserver (spawn without it) is the default, fork only when asked.
- ``multiprocessing``'s forkserver: ~13 ms a start here, and its preload list is read once,
  process-wide. "forkserver" means procsup's zygote (``procsup._process.zygote``), which imports
  each supervisor's ``preload`` at its first start, and each task's module once a trial child
  imported it cleanly and fast (``procsup._process.trials``), then forks them ready-made.
- Sending the token or args after start (a Queue, a Pipe): tokens pickle only while a process is
  being started (they carry the arena's fd), so everything travels in ``Process(args=...)``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.process
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

from procsup._os.forking import thread_repair
from procsup._os.timeouts import check_timeout
from procsup._os.tree import KILL_WAIT, REAP_DEADLINE
from procsup._supervision import handle
from procsup._supervision.frontend import GRACE_PERIOD, Frontend, GracePeriod
from procsup._supervision.handle import CriticalTaskExecutionHandle
from procsup._supervision.local import OWN_PRELOAD, LocalBackend, LocalConfig
from procsup._supervision.options import RestartPolicy, check_options, check_preload
from procsup._token.token import CancellationToken

__all__ = ["Supervisor", "default_supervisor"]

T = TypeVar("T")


class Supervisor(Frontend):
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

    _backend: LocalBackend

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
        # Finite: the guardian must stop a dead supervisor's tasks at some point.
        grace = check_timeout(grace_period, "grace_period", finite=True)
        backend = LocalBackend(LocalConfig(start_method, (*OWN_PRELOAD, *preload), grace))
        super().__init__(backend, token)
        self._pid = os.getpid()  # a forked copy of this object is inert
        _ALL.add(self)

    @property
    def start_method(self) -> str:
        """The multiprocessing start method of this supervisor's tasks."""
        return self._backend.config.start_method

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
                an unknown policy; TypeError for a ``task_fn`` or an argument that cannot be
                pickled under spawn or forkserver, named in the message); no process is started
                then.
            ImportError: a ``preload`` module raised when imported (the first spawn imports
                them); the message names it and its error, and no process is started.
            RuntimeError: after ``shutdown()``.
        """
        options = check_options(
            restart, max_restarts, period, backoff, memory_limit, cpu_time_limit, timeout,
            capture_output,
        )  # fmt: skip
        return self._spawn(task_fn, description, args, kwargs, parent_token, options)

    def _launched(self) -> None:
        with self._lock:
            if not self._closed:  # kept alive while it supervises, so that atexit shuts it down
                _RUNNING.add(self)

    def _owned(self) -> bool:
        return os.getpid() == self._pid

    def _shutting_down(self) -> None:
        _RUNNING.discard(self)

    def _finish(self) -> None:
        # A task that SIGKILL cannot end (D state) was reported; its watch outlives us.
        backend = self._backend
        backend.join(KILL_WAIT if backend.live() else REAP_DEADLINE)

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{self._backend.live_count()} live tasks"
        return f"<procsup.Supervisor {self.start_method}, {state}>"


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


def _shutdown_default(timeout: float | GracePeriod | None = GRACE_PERIOD) -> None:
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
    # Only what there is to forget is written: in a zygote's task, nothing (its pages stay shared).
    global _default
    if _default is not None:
        _default = None
    if _ALL:
        _ALL.clear()
    if _RUNNING:
        _RUNNING.clear()


def _new_lock() -> None:
    global _default_lock
    _default_lock = threading.Lock()


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
os.register_at_fork(after_in_child=thread_repair(_new_lock))
handle.set_default_runtime(default_supervisor)
