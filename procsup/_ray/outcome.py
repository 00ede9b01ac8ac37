"""A run's outcome on its way from a node to the driver, and the errors of a node that was lost.

::

    agent (node)                                             driver
    ────────────                                             ──────
    local Run.future ─▶ encode(): Outcome                    decode(Outcome) -> value | error
      returned v       value = encode_return(v) ────────▶      decode(frame): v, or a
                                                               TaskFailedError if v cannot be
                                                               unpickled in the driver
      raised / crashed error (its crash record) ────────▶      the error, its __cause__ rebuilt
                       cause = encode_error(__cause__) ──▶       with the task's frames
    the agent or its node is lost (Ray's ActorDiedError) ▶   lost(): TaskCrashedError naming
                                                               the node, .signal None

Things that don't work
----------------------
- Letting Ray pickle the error with its ``__cause__``: pickling drops causes and tracebacks
  (``procsup._outcome.errors``), so the child's frames would stop at the node. The cause travels
  as the same error frame a task sends its supervisor (``procsup._outcome.remote``).
- Letting Ray carry a return value as an object: one whose class exists on the node only would
  fail to deserialize in the driver inside Ray, with a Ray error instead of the
  ``TaskFailedError`` a local task gives. It travels as a result frame, decoded here.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from procsup._outcome import remote
from procsup._outcome.errors import (
    CriticalTaskError,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._ray.messages import NodeInfo, Outcome

__all__ = ["decode", "encode", "killed", "lost", "ray_reason"]


def encode(
    future: concurrent.futures.Future[Any], description: str, exitcode: int | None
) -> Outcome:
    """The ``Outcome`` of a local run whose future is done (on the node)."""
    error = future.exception()
    if error is None:
        value = future.result()
        try:
            return Outcome(exitcode, remote.encode_return(value), None, None)
        except Exception as exc:  # noqa: BLE001 - pickling can raise anything a __reduce__ raises
            error = TaskFailedError(
                f"Critical task '{description}' failed: PicklingError: its return value "
                f"({type(value).__qualname__}) cannot be sent to the driver: {exc}",
                description=description,
                exitcode=exitcode,
            )
            return Outcome(exitcode, None, error, remote.encode_error(exc))
    if not isinstance(error, CriticalTaskError):  # the local backend publishes nothing else
        wrapped = CriticalTaskError(
            f"Critical task '{description}' ended with an unexpected error: {error!r}",
            description=description,
            exitcode=exitcode,
        )
        return Outcome(exitcode, None, wrapped, remote.encode_error(error))
    cause = error.__cause__
    return Outcome(exitcode, None, error, None if cause is None else remote.encode_error(cause))


def _body(frame: bytes) -> memoryview:
    reader = remote.FrameReader()
    reader.feed(frame)
    assert reader.body is not None, "a frame encoded whole on the node"
    return reader.body


def decode(outcome: Outcome, description: str, pid: int) -> tuple[Any, CriticalTaskError | None]:
    """``(value, None)`` or ``(None, error)``, the error's ``__cause__`` with its frames."""
    if outcome.value is not None:
        decoded = remote.decode(_body(outcome.value))
        if isinstance(decoded, remote.Returned):
            return decoded.value, None
        return None, _failure(decoded, description, pid)  # the value does not unpickle here
    error = outcome.error
    assert error is not None, "an Outcome carries a value or an error"
    if outcome.cause is not None:
        report = remote.decode(_body(outcome.cause))
        if isinstance(report, remote.ErrorReport):
            error.__cause__ = remote.rebuild(report)
    return None, error


def _failure(report: remote.ErrorReport, description: str, pid: int) -> CriticalTaskError:
    """As the local supervision thread words a task's error report."""
    cls = TaskPanickedError if report.panicked else TaskFailedError
    kind = "panicked" if report.panicked else "failed"
    what = f"{report.short_name}: {report.message}" if report.message else report.short_name
    error = cls(
        f"Critical task '{description}' {kind}: {what}",
        description=description,
        pid=pid,
        remote_traceback=report.text,
    )
    error.__cause__ = remote.rebuild(report)
    return error


def ray_reason(exc: BaseException) -> str:
    """The line of a Ray error that says why (Ray's messages lead with boilerplate)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "because" in line or "died" in line or "dead" in line:
            return line.rstrip(".")
    return lines[-1].rstrip(".") if lines else type(exc).__name__


def lost(description: str, pid: int, node: NodeInfo, why: str) -> TaskCrashedError:
    """A run whose agent or node was lost before its outcome was known: a crash (the parent is
    cancelled), with no signal, since nobody saw the process end."""
    error = TaskCrashedError(
        f"Critical task '{description}' crashed: lost with Ray node {node}: {why} (pid {pid})",
        description=description,
        pid=pid,
    )
    error.add_note(f"Ray node: {node.node_id}, ip {node.ip}, host {node.hostname}")
    return error


def killed(
    description: str, pid: int, node: NodeInfo, stop_reason: str, waited: float
) -> TaskCrashedError:
    """A run being stopped on request whose node did not answer, so its agent was killed."""
    return TaskCrashedError(
        f"Critical task '{description}' was stopped on request: {stop_reason}, then its agent "
        f"on Ray node {node} was killed (ray.kill): the node did not answer within {waited:g} s "
        f"(pid {pid})",
        description=description,
        pid=pid,
        stopped=True,
    )
