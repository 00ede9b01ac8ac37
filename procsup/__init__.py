"""procsup: critical tasks in child processes, supervised.

A task that raises, exits nonzero or crashes cancels its parent cancellation token at once,
so the whole system shuts down cleanly and the caller learns exactly what happened.
"""

from __future__ import annotations

from procsup._token import CancellationToken, DropGuard

__all__ = [
    "CancellationToken",
    "DropGuard",
]
