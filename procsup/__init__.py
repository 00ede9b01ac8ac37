"""procsup: critical tasks in child processes, supervised.

A task that raises, exits nonzero or crashes cancels its parent cancellation token at once,
so the whole system shuts down cleanly and the caller learns exactly what happened.
"""

from __future__ import annotations

from procsup._errors import (
    CriticalTaskError,
    NotDetachedError,
    RemoteTraceback,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._handle import CriticalTaskExecutionHandle
from procsup._status import EventStream, TaskEvent, TaskSnapshot
from procsup._supervisor import Supervisor, default_supervisor
from procsup._token import CancellationToken, DropGuard

__all__ = [
    "CancellationToken",
    "CriticalTaskError",
    "CriticalTaskExecutionHandle",
    "DropGuard",
    "EventStream",
    "NotDetachedError",
    "RemoteTraceback",
    "Supervisor",
    "TaskCrashedError",
    "TaskEvent",
    "TaskFailedError",
    "TaskPanickedError",
    "TaskSnapshot",
    "default_supervisor",
]
