"""procsup: critical tasks in child processes, supervised.

A task that raises, exits nonzero or crashes cancels its parent cancellation token at once,
so the whole system shuts down cleanly and the caller learns exactly what happened.
"""

from __future__ import annotations

from procsup._executor.executor import Executor
from procsup._outcome.errors import (
    BrokenExecutorError,
    CriticalTaskError,
    NotDetachedError,
    RemoteTraceback,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._supervision.handle import CriticalTaskExecutionHandle
from procsup._supervision.status import EventStream, TaskEvent, TaskSnapshot
from procsup._supervision.supervisor import Supervisor, default_supervisor
from procsup._token.current import current_token
from procsup._token.token import CancellationToken, DropGuard

__all__ = [
    "BrokenExecutorError",
    "CancellationToken",
    "CriticalTaskError",
    "CriticalTaskExecutionHandle",
    "DropGuard",
    "EventStream",
    "Executor",
    "NotDetachedError",
    "RemoteTraceback",
    "Supervisor",
    "TaskCrashedError",
    "TaskEvent",
    "TaskFailedError",
    "TaskPanickedError",
    "TaskSnapshot",
    "current_token",
    "default_supervisor",
]
