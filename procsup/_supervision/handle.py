"""CriticalTaskExecutionHandle: the caller's side of one critical task in one child process.

The handle is a thin view on the task's ``Lifecycle`` (``procsup._supervision.lifecycle``): the
outcome is decided, the parent token cancelled and the process reaped by the supervision thread,
whether or not anybody holds the handle. What the handle adds is the seed's contract with its
caller: ``join()`` or ``detach()`` before letting go.

A handle runs under a ``Runtime``: anything that makes a task's ``Lifecycle`` (``Supervisor``,
and ``procsup.ray.RaySupervisor``). The default one, the process-wide ``default_supervisor()``, is
named by ``procsup._supervision.supervisor`` when it is imported (``set_default_runtime``): the
handle sits below the supervisor, which returns handles from ``spawn()``.

Things that don't work
----------------------
- Raising from ``__del__`` the way the seed's ``Drop`` panics: Python reports exceptions raised in
  finalizers through ``sys.unraisablehook`` and carries on, which is what we want anyway (the task
  keeps running, supervised); a ``with`` block is where we can raise for real.
- Deciding outcomes in ``join()``: a detached task nobody joins must still cancel its parent within
  milliseconds of failing (seed tests 9 and 10), so ``join()`` only reads a published outcome.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast, overload, runtime_checkable

from procsup._os.timeouts import check_timeout
from procsup._os.tree import REAP_DEADLINE
from procsup._outcome.errors import CriticalTaskError, NotDetachedError
from procsup._supervision.lifecycle import Lifecycle
from procsup._supervision.runtime import Run
from procsup._token.token import CancellationToken

__all__ = ["CriticalTaskExecutionHandle", "Runtime", "set_default_runtime"]

T = TypeVar("T")

_NOT_DETACHED = "Critical task was not detached prior to drop!"


@runtime_checkable
class Runtime(Protocol):
    """What a handle runs under: it makes a task's ``Lifecycle`` and starts its first run."""

    def _launch(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> Lifecycle: ...


_default_runtime: Callable[[], Runtime] | None = None


def set_default_runtime(factory: Callable[[], Runtime]) -> None:
    """Name the runtime of handles made with ``runtime=None`` (the default supervisor)."""
    global _default_runtime
    _default_runtime = factory


class CriticalTaskExecutionHandle(Generic[T]):
    """Runs ``task_fn(token, *args, **kwargs)`` in a child process as a critical task.

    ``token`` is ``parent_token.child_token()``, created before the process starts (so a task whose
    parent is already cancelled starts with a cancelled token). If the task raises, exits without
    reporting or crashes, the supervisor cancels ``parent_token`` before publishing the outcome,
    whether or not the handle is still held. ``handle.cancel()`` asks the task to stop gracefully
    and never touches the parent.

    ``task_fn`` may be an ``async def``; it then runs in a fresh event loop in the child. It may be
    defined anywhere: in a module, in ``__main__`` (a script, ``python -c``, a REPL, a notebook),
    as a lambda, a closure, a ``functools.partial`` or a bound method. Under the spawn and
    forkserver start methods the call is pickled: by reference if the child can import it, else
    by value (cloudpickle). Tokens, multiprocessing Events, Values and Queues may be among the
    args and kwargs. Under fork nothing is pickled.

    Args:
        task_fn: The task; called in the child with its token first.
        parent_token: Cancelled if the task fails.
        description: Names the task in errors, logs and the parent's cancellation cause.
        args: Positional arguments after the token.
        kwargs: Keyword arguments, or None.
        runtime: The ``Supervisor`` (or ``procsup.ray.RaySupervisor``) to run under; None means
            the process-wide default one.

    Raises:
        TypeError: ``task_fn`` is not callable, or ``parent_token``, ``description``, ``args``,
            ``kwargs`` or ``runtime`` has a wrong type, or (under spawn/forkserver) ``task_fn``
            or an argument cannot be pickled, not even by value: the message names it. No
            process is started then.
        RuntimeError: ``runtime`` has been shut down.

    A handle must be joined (``join``, ``join_async``, ``stop``) or ``detach()``-ed before it is
    dropped, else ``NotDetachedError`` is reported through ``sys.unraisablehook``; leaving a
    ``with`` block without doing so raises it.
    """

    __module__ = "procsup"

    @overload
    def __init__(
        self: CriticalTaskExecutionHandle[T],
        task_fn: Callable[..., Awaitable[T]],
        parent_token: CancellationToken,
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        runtime: Runtime | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self: CriticalTaskExecutionHandle[T],
        task_fn: Callable[..., T],
        parent_token: CancellationToken,
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        runtime: Runtime | None = None,
    ) -> None: ...

    def __init__(
        self,
        task_fn: Callable[..., Any],
        parent_token: CancellationToken,
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self._detached = True  # until the task exists, there is nothing to report on drop
        if runtime is not None and not isinstance(runtime, Runtime):
            raise TypeError(f"runtime must be a Supervisor or None, not {type(runtime).__name__}")
        if runtime is None:
            assert _default_runtime is not None, "procsup._supervision.supervisor names it"
            runtime = _default_runtime()
        self._life: Lifecycle = runtime._launch(task_fn, parent_token, description, args, kwargs)
        self._detached = False

    @classmethod
    def _adopt(cls, life: Lifecycle) -> CriticalTaskExecutionHandle[Any]:
        """The handle of a task ``Supervisor.spawn`` has started."""
        handle: CriticalTaskExecutionHandle[Any] = cls.__new__(cls)
        handle._life = life
        handle._detached = False
        return handle

    @property
    def _task(self) -> Run:
        """The current (or last) run."""
        record = self._life.record
        assert record is not None, "a handle exists only once its first run has started"
        return record

    @classmethod
    def new(
        cls,
        task_fn: Callable[..., Any],
        parent_token: CancellationToken,
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> CriticalTaskExecutionHandle[Any]:
        """Start a critical task on the process-wide default supervisor (seed parity)."""
        return cls(task_fn, parent_token, description, args=args, kwargs=kwargs)

    @classmethod
    def new_with_runtime(
        cls,
        task_fn: Callable[..., Any],
        parent_token: CancellationToken,
        description: str,
        runtime: Runtime,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> CriticalTaskExecutionHandle[Any]:
        """Start a critical task on ``runtime`` (seed parity)."""
        return cls(task_fn, parent_token, description, args=args, kwargs=kwargs, runtime=runtime)

    @property
    def description(self) -> str:
        """The description given at creation."""
        return self._life.description

    @property
    def pid(self) -> int:
        """The task's process id (of its current run, for a task that was restarted)."""
        return self._task.pid

    @property
    def node_id(self) -> str | None:
        """The Ray node (hex id) of the task's current run (``procsup.ray.RaySupervisor``), or
        None for a task on this machine: where ``pid`` is."""
        return self._task.node_id

    @property
    def restarts(self) -> int:
        """How many times the task was restarted (0 for a ``temporary`` task)."""
        return self._life.restarts

    @property
    def last_failure(self) -> CriticalTaskError | None:
        """The error of the last run that failed or crashed (not stopped on request), or None."""
        return self._life.last_failure

    @property
    def exitcode(self) -> int | None:
        """None until the process has been reaped; then its exit code, ``-N`` for signal N."""
        return self._task.exitcode

    def is_finished(self) -> bool:
        """Return True once the outcome is published (process reaped, parent cancelled if due)."""
        return self._life.future.done()

    def is_cancelled(self) -> bool:
        """Return True if the task's own token is cancelled (by ``cancel()`` or an ancestor)."""
        return self._task.spec.token.is_cancelled()

    def cancel(self) -> None:
        """Ask the task to stop by cancelling its token; never cancels the parent. Idempotent.

        A restartable task is not restarted after this; if it was waiting to be restarted, its last
        run's outcome becomes final at once.
        """
        self._life.cancel(f"Critical task '{self.description}' was cancelled by its handle")

    def join(self, timeout: float | None = None) -> T:
        """Wait for the task's outcome and return its value, or raise its error.

        Args:
            timeout: Seconds to wait; None (or ``math.inf``) waits for as long as it takes; 0
                does not block (it polls).

        Returns:
            The task's return value, once its process has exited and been reaped.

        Raises:
            TaskFailedError: the task raised an ``Exception``.
            TaskPanickedError: the task raised another ``BaseException``.
            TaskCrashedError: the process died without reporting, or was stopped on request.
            CriticalTaskError: the supervisor was lost before the outcome was known.
            TimeoutError: ``timeout`` elapsed; nothing is cancelled and ``join`` may be retried.
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number.

        May be called any number of times; each call returns (or raises) the same outcome.

        On the supervision thread (an ``on_event`` callback), which alone publishes outcomes,
        ``join()`` of a task whose outcome is not published yet raises ``RuntimeError`` at once,
        whatever ``timeout`` says: it could only hang. A published outcome is returned (or
        raised) as anywhere else; the final event of a restartable task comes just before its
        outcome is published.
        """
        wait = check_timeout(timeout)
        self._detached = True  # as in the seed, join() consumes the obligation to detach
        life = self._life
        if not life.future.done() and life.backend.on_outcome_thread():
            raise RuntimeError(
                f"join() of critical task '{self.description}' on the supervision thread (an "
                "on_event callback?): its outcome is published by that very thread, so the wait "
                "could never end; join it from another thread"
            )
        try:
            return self._life.future.result(wait)  # type: ignore[no-any-return]
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"Critical task '{self.description}' (pid {self.pid}) did not finish within "
                f"{timeout} s; it is still running and supervised"
            ) from None

    async def join_async(self) -> T:
        """Asyncio form of ``join()``: same value, same errors.

        Cancelling the awaiting coroutine (e.g. ``asyncio.wait_for`` timing out) cancels nothing in
        the task.
        """
        import asyncio  # not at module level: see procsup._supervision.aio

        self._detached = True
        return await asyncio.wrap_future(self._life.future)

    async def stop_async(self, timeout: float | None = 5.0) -> T:
        """Asyncio form of ``stop()``: the waits and signals happen without blocking the loop.

        ``timeout`` means what it means for ``stop()``, and is checked the same way.
        """
        import asyncio

        wait = check_timeout(timeout)
        self._detached = True
        self._life.stop(*self._stop_reasons(timeout), wait)
        return await asyncio.wrap_future(self._life.future)

    def detach(self) -> None:
        """Let the handle go: the task keeps running, supervised; its parent is still cancelled if
        it fails. Idempotent."""
        self._detached = True

    def stop(self, timeout: float | None = 5.0) -> T:
        """Cancel the task, wait ``timeout`` seconds, then SIGTERM and (a second later) freeze and
        SIGKILL its whole process tree; return or raise like ``join()``.

        Args:
            timeout: Seconds the task gets to honour cancellation; None (or ``math.inf``) waits
                forever, 0 escalates at once.

        A task killed here raises ``TaskCrashedError`` with ``stopped=True`` and leaves its parent
        token alone; a task that returns or fails in time behaves exactly as with ``join()``.

        On the supervision thread (an ``on_event`` callback) nothing can be waited for: that
        thread alone steps the escalation and publishes outcomes. ``stop()`` then returns at
        once, with the task on its way down (no restart; its token cancelled; SIGTERM and
        SIGKILL scheduled after ``timeout``): it returns or raises like ``join()`` if the
        outcome is published already, else it returns None; ``join()`` it from another thread.

        Raises:
            TimeoutError: The task survived SIGKILL (a process stuck in the kernel, D state); the
                message gives its pid and ``/proc`` state. ``stop()`` never waits for it longer.
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number; nothing is
                cancelled then.
        """
        wait = check_timeout(timeout)
        self._detached = True
        life = self._life
        ladder = life.stop(*self._stop_reasons(timeout), wait)
        if life.backend.on_outcome_thread():  # every wait below needs this very thread
            return self.join() if life.future.done() else cast(T, None)
        # Again if a restart was under way: its run is stopped too, on a ladder of its own.
        while ladder is not None and not life.future.done():
            concurrent.futures.wait([life.future, ladder.done], return_when="FIRST_COMPLETED")
            if life.future.done() or not ladder.done.done():
                break
            stuck = ladder.done.result()
            if stuck:
                raise TimeoutError(
                    f"stop(): {'; '.join(stuck)}; it stays supervised, and its outcome is "
                    "published if it ever dies"
                )
            if life.ladder is ladder:  # every process of it has exited: the outcome is on its way
                break
            ladder = life.ladder
        return self.join(REAP_DEADLINE)

    def _stop_reasons(self, timeout: float | None) -> tuple[str, str]:
        return (
            f"Critical task '{self.description}' stop requested",
            f"it did not honour cancellation within {timeout} s",
        )

    def __enter__(self) -> CriticalTaskExecutionHandle[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # With an exception in flight we do not mask it: the handle stays undetached and its drop
        # reports NotDetachedError through sys.unraisablehook.
        if not self._detached and exc_type is None:
            self._detached = True
            raise self._not_detached()

    def _not_detached(self) -> NotDetachedError:
        return NotDetachedError(
            f"{_NOT_DETACHED} (task '{self.description}', pid {self.pid})",
            description=self.description,
            pid=self.pid,
        )

    def __del__(self) -> None:
        if not getattr(self, "_detached", True):
            self._detached = True
            raise self._not_detached()

    def __repr__(self) -> str:
        task = self._task
        if self._life.future.done():
            state = f"finished, exitcode={task.exitcode}"
        else:
            state = "cancelled" if task.spec.token.is_cancelled() else "running"
        return f"<CriticalTaskExecutionHandle {self.description!r} pid={task.pid} {state}>"
