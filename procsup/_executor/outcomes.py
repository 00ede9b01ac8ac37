"""What an executor item's future raises: its own exception, or an error that names the item.

::

    DONE frame ─ remote.decode ─▶ Returned(value)                    ─▶ the value
                                  ErrorReport, an Exception           ─▶ that exception, rebuilt
                                                                         with the worker's
                                                                         traceback (as CF raises)
                                                    ... that did not survive pickling
                                                                      ─▶ TaskFailedError, its
                                                                         cause a RemoteTraceback
                                  ErrorReport, another BaseException  ─▶ TaskPanickedError
    the worker's run ended ──────▶ TaskCrashedError about the worker  ─▶ TaskCrashedError about
      with the item in hand        (signal, exit code, crash record)     the item, same record
                                   anything else (its loop failed, the
                                   backend was lost)                  ─▶ CriticalTaskError "lost"
    INIT_FAILED frame ───────────────────────────────────────────────▶ BrokenExecutorError with
                                                                         the initializer's
                                                                         traceback (every waiting
                                                                         item, every submit)
    the deadline passed ─────────────────────────────────────────────▶ TimeoutError, its cause
                                                                         whatever ended the item

Messages read "Executor item '<description>' crashed: ...", where the description is the
function's name and the item's number in its executor ("parse #17"): a log line or a token's
cause says which call it was.
"""

from __future__ import annotations

from typing import Any

from procsup._outcome import remote
from procsup._outcome.errors import (
    BrokenExecutorError,
    CriticalTaskError,
    RemoteTraceback,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)

__all__ = ["broken", "cause", "crashed", "init_failed", "reported", "timed_out"]


def reported(description: str, pid: int, body: bytes) -> tuple[Any, BaseException | None]:
    """``(value, None)`` or ``(None, error)`` from the outcome frame body of a DONE reply."""
    decoded = remote.decode(body)
    if isinstance(decoded, remote.Returned):
        return decoded.value, None
    what = f"{decoded.short_name}: {decoded.message}" if decoded.message else decoded.short_name
    rebuilt = remote.rebuild(decoded)
    if decoded.panicked:
        error: CriticalTaskError = TaskPanickedError(
            f"Executor item '{description}' panicked: {what}",
            description=description,
            pid=pid,
            remote_traceback=decoded.text,
        )
    elif isinstance(rebuilt, RemoteTraceback):
        error = TaskFailedError(
            f"Executor item '{description}' failed: {what}",
            description=description,
            pid=pid,
            remote_traceback=decoded.text,
        )
    else:
        return None, rebuilt
    error.__cause__ = rebuilt
    return None, error


def crashed(
    description: str, worker: str, error: BaseException | None, received: int
) -> BaseException:
    """The error of an item whose worker (described ``worker``) ended while it ran, from the
    worker's outcome ``error`` (None: it returned); ``received``: bytes of the item's outcome
    that had arrived."""
    sent = f"; it had sent {received} bytes of its outcome" if received else ""
    if isinstance(error, TaskCrashedError):
        prefix = f"Critical task '{worker}' "
        text = error.message
        if text.startswith(prefix):
            text = text[len(prefix) :]
        item = TaskCrashedError(
            f"Executor item '{description}' {text}{sent}",
            description=description,
            pid=error.pid,
            exitcode=error.exitcode,
            signal=error.signal,
            stopped=error.stopped,
            core_dumped=error.core_dumped,
            peak_rss=error.peak_rss,
            wall_time=error.wall_time,
            cpu_time=error.cpu_time,
            stderr_tail=error.stderr_tail,
            faulthandler_dump=error.faulthandler_dump,
        )
        for note in getattr(error, "__notes__", ()):
            item.add_note(note)
        return item
    why = "it returned" if error is None else str(error)
    lost = CriticalTaskError(
        f"Executor item '{description}' was lost: its worker process ended without reporting "
        f"it ({why}){sent}",
        description=description,
        pid=getattr(error, "pid", None),
        exitcode=getattr(error, "exitcode", None),
    )
    lost.__cause__ = error
    return lost


def timed_out(description: str, timeout: float, error: BaseException | None) -> TimeoutError:
    """The builtin TimeoutError of an item past its deadline; ``error`` (its cause) is what it
    raised after its token was cancelled, or its worker's crash once killed, or None if it
    returned within the grace period."""
    timeout_error = TimeoutError(f"Executor item '{description}' timed out after {timeout:g} s")
    timeout_error.__cause__ = error
    return timeout_error


def cause(description: str, error: BaseException) -> str:
    """The executor token's cause when ``error`` ends a ``critical=True`` executor's item."""
    if isinstance(error, CriticalTaskError | TimeoutError):
        return str(error).splitlines()[0]
    what = f"{type(error).__qualname__}: {error}" if str(error) else type(error).__qualname__
    return f"Executor item '{description}' failed: {what}"


def init_failed(worker: str, pid: int, body: bytes) -> BrokenExecutorError:
    """The error that breaks an executor whose worker's initializer raised (``body``: the
    outcome frame the worker sent, its traceback inside)."""
    decoded = remote.decode(body)
    if isinstance(decoded, remote.Returned):  # not what a worker sends: say so all the same
        return broken(f"{worker} (pid {pid}) reported a failed initializer without its error")
    what = f"{decoded.short_name}: {decoded.message}" if decoded.message else decoded.short_name
    error = broken(
        f"the initializer of {worker} (pid {pid}) raised {what}\n"
        f"The initializer's traceback, in the worker:\n{decoded.text.rstrip()}",
        pid=pid,
    )
    error.__cause__ = remote.rebuild(decoded)
    return error


def broken(why: str, pid: int | None = None) -> BrokenExecutorError:
    """The error of a broken executor: every item still waiting fails with it."""
    return BrokenExecutorError(
        f"procsup.Executor is broken and runs no more items: {why}",
        description="procsup.Executor",
        pid=pid,
    )
