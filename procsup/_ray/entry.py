"""What a task process on a node calls when its task could not be passed by reference.

The agent hands a task to its node's zygote the way a local ``Supervisor`` does: the function by
reference (its module is imported where tasks are forked from, once), the arguments pickled. A
task that came from the driver by value (a lambda, a closure, a function of the driver's
``__main__``), or arguments that plain pickle refuses, travel instead as one cloudpickle blob that
``call_pickled`` opens in the task process.

This module is imported in task processes: it imports nothing of Ray.
"""

from __future__ import annotations

from typing import Any

import cloudpickle

from procsup._process.reduction import dumps_by_value
from procsup._token.token import CancellationToken

__all__ = ["call_pickled", "pickled", "warm_up"]


def pickled(task_fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """The blob ``call_pickled`` opens: the task and its arguments, by value where needed."""
    return dumps_by_value((task_fn, args, kwargs))


def call_pickled(token: CancellationToken, blob: bytes) -> Any:
    """Open ``blob`` and run the task in it: ``task_fn(token, *args, **kwargs)``.

    An ``async def`` task returns its coroutine, which the entry point runs in a fresh loop
    (``procsup._process.entry``), as it would had the task been passed by reference.
    """
    task_fn, args, kwargs = cloudpickle.loads(blob)
    return task_fn(token, *args, **kwargs)


def warm_up(token: CancellationToken) -> int:
    """The agent's first task: boots the node's zygote and supervision thread before any real
    start needs them."""
    return 0
