"""The one meaning of a timeout, for every public call that takes one.

``join``, ``stop``, ``stop_async``, ``shutdown``, ``EventStream.get``, ``spawn(timeout=...)`` and
``CancellationToken.wait`` validate theirs here, so they agree; so do the durations that must be
finite (``Supervisor(grace_period=...)``, ``spawn``'s ``period``, ``backoff`` and
``cpu_time_limit``, with ``finite=True``, and ``positive=True`` where 0 makes no sense):

- ``None`` or ``math.inf``: no limit (wait forever; a run may take as long as it likes);
- ``0``: no time at all (a wait polls once; a run is timed out as it starts);
- any other number ``>= 0``: that many seconds;
- a negative number or NaN: ``ValueError``; anything else that is not an ``int`` or ``float``
  (``bool`` and numeric strings included): ``TypeError``.

This module imports nothing of procsup, so any layer may use it.
"""

from __future__ import annotations

import math
from typing import Literal, overload

__all__ = ["check_timeout"]


@overload
def check_timeout(
    timeout: object, name: str = ..., *, finite: Literal[False] = ...
) -> float | None: ...


@overload
def check_timeout(
    timeout: object, name: str = ..., *, finite: Literal[True], positive: bool = ...
) -> float: ...


def check_timeout(
    timeout: object, name: str = "timeout", *, finite: bool = False, positive: bool = False
) -> float | None:
    """Validate a timeout in seconds: ``None`` or infinity mean no limit, 0 means do not block.

    With ``finite=True`` it is a duration that must end: None and infinity are refused too; with
    ``positive=True`` so is 0.

    Returns:
        The timeout as a float, or None for no limit.

    Raises:
        TypeError: ``timeout`` is not None, an int or a float (``True`` is refused too).
        ValueError: ``timeout`` is negative or NaN (or not finite, or 0, when so asked).
    """
    if finite:
        bound = "> 0" if positive else ">= 0"
        if timeout is None:  # "no limit": a value this duration refuses, not a wrong type
            raise ValueError(f"{name} must be a finite number of seconds {bound}, got None")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            kind = type(timeout).__name__
            raise TypeError(f"{name} must be a number of seconds, not {kind}")
        if math.isnan(timeout) or math.isinf(timeout) or timeout < 0 or (positive and not timeout):
            raise ValueError(f"{name} must be a finite number of seconds {bound}, got {timeout!r}")
        return float(timeout)
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)
