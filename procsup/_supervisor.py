"""Supervisor: starts task processes and watches all of them from one thread.

::

    caller threads                          supervisor thread (one per Supervisor)
    ──────────────                          ───────────────────────────────────────
    spawn() ─▶ _start(): validate, token = parent.child_token(), Process(args=(fn, token, ..,
               writer)).start(), close writer, pending.append(task), wake ──┐
                                                                            ▼
               selector.select() blocks on:  wake-up pipe │ per task: exit fd │ per task: result fd
                                             (pidfd for fork/spawn, forkserver socket otherwise)
               result fd readable ─▶ read what is there (non-blocking), FrameReader.feed();
                                     an error frame cancels the parent at once
               exit fd readable   ─▶ drain the result pipe, reap, classify:
                                     frame -> value / TaskFailedError / TaskPanickedError,
                                     none  -> TaskCrashedError (signal and likely cause)
                                     cancel the parent (unless a stop was requested), log,
                                     THEN publish on the task's Future
    join() ◀── Future.result(timeout) ─────────────────────────────────────────┘

Things that don't work
----------------------
- Learning of death from pipe EOF (``multiprocessing.connection.wait`` over result pipes, as
  ProcessPoolExecutor does): a grandchild holding the write end keeps the pipe open for as long as
  it lives. Death comes from the exit fd; the result pipe is only drained, never waited to EOF.
- ``Connection.recv()`` in the thread: one big result would block every other task's supervision.
- Letting ``multiprocessing.active_children()`` or another thread's ``Process.start()`` poll our
  processes: under forkserver, two concurrent polls read the same status socket and one of them
  records exit code 255. Our processes are taken out of ``multiprocessing.process._children`` and
  reaped by this thread alone.
- A daemonic ``multiprocessing.Process``: daemonic processes may not start children, which would
  forbid nested critical tasks. Tasks are non-daemonic and this module's atexit hook stops them.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import selectors
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from procsup import _platform, _remote, _task
from procsup._errors import (
    CriticalTaskError,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._token import CancellationToken, check_timeout

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from procsup._handle import CriticalTaskExecutionHandle

__all__ = ["Supervisor", "default_supervisor"]

logger = logging.getLogger("procsup")

_READ_CHUNK = 1 << 20
_READS_PER_WAKE = 16  # bounded so one chatty pipe cannot starve the other tasks' deaths
_KILL_AFTER = 1.0  # seconds between SIGTERM and SIGKILL when escalating
_REAP_DEADLINE = 30.0  # after SIGKILL; only a process stuck in the kernel (D state) takes longer
_MONITOR_LOST = "Critical task monitor was cancelled"


class _Task:
    """Supervisor-side record of one task process.

    Invariants:
        future: RUNNING until the outcome is published, then done; never cancelled. Published only
            after the process has been reaped and, for a failure, the parent cancelled.
        reader: holds every result byte read so far; its ``body`` is set once the frame is whole.
        outcome: None until a whole frame was decoded, then a Returned or an error to raise.
        conn: open (and registered) until EOF or reaping; only the supervisor thread reads it.
        exited: set under ``lock`` by the supervisor thread before it reaps, so a signal sent under
            ``lock`` never reaches a recycled pid.
        stop_reason: None, or why procsup escalated to signals (then a crash is a "stop").
        exitcode: None until reaped.
    """

    def __init__(
        self,
        description: str,
        proc: BaseProcess,
        token: CancellationToken,
        parent: CancellationToken,
        conn: Connection,
        exit_fd: int,
        owns_exit_fd: bool,
    ) -> None:
        self.description = description
        self.proc = proc
        self.pid: int = proc.pid or 0
        self.token = token
        self.parent = parent
        self.conn: Connection | None = conn
        self.exit_fd = exit_fd
        self.owns_exit_fd = owns_exit_fd
        self.reader = _remote.FrameReader()
        self.outcome: _remote.Returned | CriticalTaskError | None = None
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # so asyncio.wrap_future can never cancel it
        self.lock = threading.Lock()
        self.exited = False
        self.stop_reason: str | None = None
        self.exitcode: int | None = None


def _validate(
    task_fn: object, parent: object, description: object, args: object, kwargs: object, method: str
) -> None:
    if not callable(task_fn):
        raise TypeError(f"task_fn must be callable, not {type(task_fn).__name__}")
    if not isinstance(parent, CancellationToken):
        raise TypeError(f"parent_token must be a CancellationToken, not {type(parent).__name__}")
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, not {type(description).__name__}")
    if not isinstance(args, tuple | list):
        raise TypeError(f"args must be a tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping or None, not {type(kwargs).__name__}")
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


class Supervisor:
    """Starts critical tasks in child processes and supervises them from one thread.

    Args:
        start_method: "forkserver" (the default where available), "spawn" or "fork".
        token: The root token; tasks spawned without a parent are its children. A new root if None.
        preload: Modules the forkserver (or, under fork, this process) imports once, up front.
        grace_period: Seconds ``shutdown()`` gives tasks to honour cancellation before escalating.

    The thread starts with the first task. ``shutdown()`` (also run by ``with`` and at interpreter
    exit) cancels the root and every task, waits, escalates, and reaps everything.
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
        preload = [preload] if isinstance(preload, str) else list(preload)
        if not all(isinstance(m, str) for m in preload):
            raise TypeError("preload must be an iterable of module names")
        grace = check_timeout(grace_period, "grace_period")
        self._grace = 5.0 if grace is None else grace
        self._method = start_method
        self._ctx: BaseContext = multiprocessing.get_context(start_method)
        self._preload = ["procsup", "procsup._task", *preload]
        self.token = token if token is not None else CancellationToken()
        self._lock = threading.Lock()  # guards everything below that both sides touch
        self._live: set[_Task] = set()
        self._pending: list[_Task] = []
        self._closed = False
        self._exiting = False
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._pid = os.getpid()
        _ALL.add(self)

    @property
    def start_method(self) -> str:
        """The multiprocessing start method of this supervisor's tasks."""
        return self._method

    @property
    def grace_period(self) -> float:
        """Seconds ``shutdown()`` waits for tasks to honour cancellation."""
        return self._grace

    def spawn(
        self,
        task_fn: Callable[..., Any],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
    ) -> CriticalTaskExecutionHandle[Any]:
        """Start ``task_fn(token, *args, **kwargs)`` as a critical task; return its handle.

        ``parent_token`` defaults to this supervisor's root token. Raises as
        ``CriticalTaskExecutionHandle`` does, and ``RuntimeError`` after ``shutdown()``.
        """
        from procsup._handle import CriticalTaskExecutionHandle

        parent = self.token if parent_token is None else parent_token
        return CriticalTaskExecutionHandle(
            task_fn, parent, description, args=args, kwargs=kwargs, runtime=self
        )

    # ---------------------------------------------------------------- starting

    def _start(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> _Task:
        _validate(task_fn, parent, description, args, kwargs, self._method)
        if os.getpid() != self._pid:
            raise RuntimeError("a Supervisor cannot be used in a process forked from its owner")
        with self._lock:
            if self._closed:
                raise RuntimeError("this Supervisor has been shut down")
            if self._thread is None:
                self._boot(getattr(task_fn, "__module__", None))
        token = parent.child_token()
        reader, writer = self._ctx.Pipe(duplex=False)
        _platform.enlarge_pipe(writer.fileno())
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=_task.main,
            args=(task_fn, token, tuple(args), dict(kwargs or {}), writer),
            name=f"procsup: {description}",
        )
        try:
            proc.start()
        except BaseException as exc:
            reader.close()
            writer.close()
            if isinstance(exc, pickle.PicklingError | TypeError | AttributeError):
                raise TypeError(
                    f"critical task {description!r} could not be started: its function, args "
                    f"and kwargs must be picklable under the {self._method!r} start method ({exc})"
                ) from exc
            raise
        writer.close()  # so the child holds the only write end we know of
        # Reaped by our thread alone (see "Things that don't work").
        multiprocessing.process._children.discard(proc)  # type: ignore[attr-defined]
        os.set_blocking(reader.fileno(), False)
        exit_fd, owned = _platform.exit_notifier(proc, self._method)
        task = _Task(description, proc, token, parent, reader, exit_fd, owned)
        with self._lock:
            exiting = self._exiting
            if not exiting:
                self._live.add(task)
                self._pending.append(task)
        if exiting:  # shutdown() finished while we were starting: undo
            _platform.signal_tree(task.pid, signal.SIGKILL)
            proc.join()
            self._release(task)
            raise RuntimeError("this Supervisor has been shut down")
        self._wake()
        return task

    def _boot(self, task_module: str | None) -> None:
        modules = list(self._preload)
        if task_module and task_module != "__main__" and task_module not in modules:
            modules.append(task_module)
        if self._method == "forkserver":
            # Takes effect only if the (process-wide) forkserver is not running yet.
            self._ctx.set_forkserver_preload(modules)
        elif self._method == "fork":
            for name in modules:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._run, name="procsup-supervisor", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        with contextlib.suppress(BlockingIOError):  # a full pipe already means "wake up"
            os.write(self._wake_w, b"\0")

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while True:
                events = selector.select()
                deaths = []
                for key, _ in events:
                    role, task = key.data
                    if role == "wake":
                        with contextlib.suppress(BlockingIOError):
                            while os.read(self._wake_r, 4096):
                                pass
                    elif role == "result":
                        self._read(task, _READS_PER_WAKE)
                    else:
                        deaths.append(task)
                for task in deaths:
                    self._finish(task)
                with self._lock:
                    pending, self._pending = self._pending, []
                    done = self._exiting and not self._live
                for task in pending:
                    self._watch(task)
                if done:
                    return
        except BaseException:
            logger.exception("procsup supervisor thread died; its tasks are no longer supervised")
        finally:
            self._lose_all()

    def _watch(self, task: _Task) -> None:
        assert self._selector is not None
        assert task.conn is not None
        self._selector.register(task.conn.fileno(), selectors.EVENT_READ, ("result", task))
        self._selector.register(task.exit_fd, selectors.EVENT_READ, ("exit", task))

    def _read(self, task: _Task, budget: int | None) -> None:
        """Read what the pipe holds (up to ``budget`` chunks); decode once the frame is whole."""
        conn = task.conn
        while conn is not None and (budget is None or budget > 0):
            try:
                data = os.read(conn.fileno(), _READ_CHUNK)
            except BlockingIOError:
                break
            if not data:
                self._close_result(task)
                break
            if task.reader.feed(data) and task.outcome is None:
                self._decode(task)
            if budget is not None:
                budget -= 1

    def _close_result(self, task: _Task) -> None:
        if task.conn is not None:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(task.conn.fileno())
            task.conn.close()
            task.conn = None

    def _decode(self, task: _Task) -> None:
        assert task.reader.body is not None
        decoded = _remote.decode(task.reader.body)
        if isinstance(decoded, _remote.Returned):
            task.outcome = decoded
            return
        cls = TaskPanickedError if decoded.panicked else TaskFailedError
        kind = "panicked" if decoded.panicked else "failed"
        what = f"{decoded.short_name}: {decoded.message}" if decoded.message else decoded.short_name
        error = cls(
            f"Critical task '{task.description}' {kind}: {what}",
            description=task.description,
            pid=task.pid,
            remote_traceback=decoded.text,
        )
        error.__cause__ = _remote.rebuild(decoded)
        task.outcome = error
        if task.stop_reason is None:
            # Cancel now, not at reaping: the process may take a while to exit after reporting.
            task.parent.cancel(str(error))

    def _finish(self, task: _Task) -> None:
        """The process has exited: drain its pipe, reap it, classify, cancel, then publish."""
        self._read(task, None)
        assert self._selector is not None
        self._selector.unregister(task.exit_fd)
        with task.lock:
            task.exited = True
        task.proc.join()
        task.exitcode = exitcode = task.proc.exitcode
        self._release(task)
        outcome = task.outcome
        if isinstance(outcome, _remote.Returned):
            logger.debug("Critical task '%s' completed successfully", task.description)
            task.future.set_result(outcome.value)
            return
        error = outcome if outcome is not None else self._crash(task, exitcode)
        error.exitcode = exitcode
        if task.stop_reason is not None:
            error = self._stopped(task, exitcode, error)
            logger.warning("%s", error)
        else:
            task.parent.cancel(str(error))
            logger.error("%s", error)
        task.future.set_exception(error)

    def _crash(self, task: _Task, exitcode: int | None) -> TaskCrashedError:
        text, sig = _platform.describe_exit(255 if exitcode is None else exitcode)
        if task.reader.received:
            text += f"; it had sent {task.reader.received} bytes of its result"
        return TaskCrashedError(
            f"Critical task '{task.description}' crashed: {text} (pid {task.pid})",
            description=task.description,
            pid=task.pid,
            exitcode=exitcode,
            signal=sig,
        )

    def _stopped(
        self, task: _Task, exitcode: int | None, error: CriticalTaskError
    ) -> TaskCrashedError:
        text, sig = _platform.describe_exit(255 if exitcode is None else exitcode)
        head = text.split(":")[0]  # "killed by SIGTERM (signal 15)", without the likely cause
        stopped = TaskCrashedError(
            f"Critical task '{task.description}' was stopped on request: {task.stop_reason}, "
            f"then {head} (pid {task.pid})",
            description=task.description,
            pid=task.pid,
            exitcode=exitcode,
            signal=sig,
            stopped=True,
        )
        if not isinstance(error, TaskCrashedError):
            stopped.__cause__ = error
        return stopped

    def _release(self, task: _Task) -> None:
        self._close_result(task)
        if task.owns_exit_fd:
            os.close(task.exit_fd)
        task.proc.close()
        with self._lock:
            self._live.discard(task)

    def _lose_all(self) -> None:
        with self._lock:
            self._closed = True
            lost = list(self._live)
        for task in lost:
            if not task.future.done():
                task.future.set_exception(
                    CriticalTaskError(_MONITOR_LOST, description=task.description, pid=task.pid)
                )

    # ---------------------------------------------------------------- stopping

    def _escalate(self, tasks: list[_Task], reason: str) -> None:
        """SIGTERM each task's tree, give them ``_KILL_AFTER`` seconds, then SIGKILL the rest."""
        for task in tasks:
            with task.lock:
                if not task.exited:
                    task.stop_reason = reason
                    _platform.signal_tree(task.pid, signal.SIGTERM)
        concurrent.futures.wait([task.future for task in tasks], _KILL_AFTER)
        for task in tasks:
            with task.lock:
                if not task.exited:
                    _platform.signal_tree(task.pid, signal.SIGKILL)

    def shutdown(self, timeout: float | None = None) -> None:
        """Cancel the root token and every task, wait, escalate the stragglers, reap everything.

        Args:
            timeout: Seconds tasks get to honour cancellation before they are sent SIGTERM, then
                (one second later) SIGKILL; None means the supervisor's ``grace_period``; 0 means
                escalate at once.

        Idempotent. Outcomes stay available on the handles. Tasks killed here raise
        ``TaskCrashedError`` (stopped on request) from ``join()`` and leave their parent alone.
        """
        wait = check_timeout(timeout)
        wait = self._grace if timeout is None else wait
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._closed = True
            tasks = list(self._live)
            thread = self._thread
        self.token.cancel("Supervisor shut down")
        if thread is None:
            return
        while tasks:  # again, for any task whose start was under way when we closed
            for task in tasks:
                task.token.cancel("Supervisor shut down")
            futures = [task.future for task in tasks]
            concurrent.futures.wait(futures, wait)
            stragglers = [task for task in tasks if not task.future.done()]
            if stragglers:
                reason = f"it did not honour cancellation within {wait} s of shutdown"
                self._escalate(stragglers, reason)
            concurrent.futures.wait(futures, _REAP_DEADLINE)
            with self._lock:
                tasks = [task for task in self._live if task.future not in futures]
        with self._lock:
            self._exiting = True
        self._wake()
        thread.join(_REAP_DEADLINE)
        if not thread.is_alive() and self._selector is not None:
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._selector = None
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{len(self._live)} live tasks"
        return f"<procsup.Supervisor {self._method}, {state}>"


Supervisor.__module__ = "procsup"

_ALL: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_default: Supervisor | None = None
_default_lock = threading.Lock()


def default_supervisor() -> Supervisor:
    """Return the process-wide supervisor (used when ``runtime`` is None); made on first use."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Supervisor()
        return _default


def _shutdown_default(timeout: float | None = None) -> None:
    """Shut the default supervisor down and forget it (tests use this between cases)."""
    global _default
    with _default_lock:
        sup, _default = _default, None
    if sup is not None:
        sup.shutdown(timeout)


def _shutdown_all() -> None:
    for sup in list(_ALL):
        sup.shutdown()


def _forget_after_fork() -> None:
    # Supervisors' threads do not survive fork; the child starts over with a fresh default.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()
    _ALL.clear()


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
