"""The token of the critical task (or executor item) this process runs: ``current_token()``.

Set once by the child's entry point before the task function runs (``procsup._process.entry``),
and by an executor's worker around each item. A module global, not a context variable: every
thread the task starts, and every coroutine of an async task, runs under the same token; so does
a process the task forks (until a task started in it names its own).
"""

from __future__ import annotations

from procsup._token.token import CancellationToken

__all__ = ["current_token", "set_current_token"]

_current: CancellationToken | None = None


def current_token() -> CancellationToken:
    """Return the token of the critical task or executor item the caller runs in.

    Raises:
        RuntimeError: the caller is not inside a critical task or an executor item (the
            supervisor's own process, say).
    """
    token = _current
    if token is None:
        raise RuntimeError(
            "procsup.current_token() was called outside a critical task or executor item"
        )
    return token


def set_current_token(token: CancellationToken | None) -> None:
    """Name the token ``current_token()`` returns in this process (None: outside any task)."""
    global _current
    _current = token
