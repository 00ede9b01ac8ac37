"""The one meaning of a timeout, for every public call that takes one.

``join``, ``stop``, ``stop_async``, ``shutdown``, ``EventStream.get``, ``spawn(timeout=...)`` and
``CancellationToken.wait`` validate theirs here, so they agree; so do the durations that must be
finite (``Supervisor(grace_period=...)``, ``spawn``'s ``period``, ``backoff`` and
``cpu_time_limit``, with ``finite=True``, and ``positive=True`` where 0 makes no sense):

- ``None`` or ``math.inf``: no limit (wait forever; a run may take as long as it likes);
- ``0``: no time at all (a wait polls once; a run is timed out as it starts);
- any other number ``>= 0``: that many seconds; beyond ``NO_LIMIT`` (about 31 years), no limit
  (no clock a wait could use goes that far: ``threading``'s locks stop at ``TIMEOUT_MAX``);
- a negative number or NaN: ``ValueError``; anything else that is not an ``int`` or ``float``
  (``bool`` and numeric strings included): ``TypeError``. A duration that must end refuses one
  beyond ``NO_LIMIT`` with ``ValueError``.

A thread that waits in a loop for its next deadline, however far off, waits at most ``WAIT_CAP``
at a time (``capped``): ``epoll`` and ``select`` refuse a timeout beyond 2**31 - 1 ms (about 24.8
days) with ``OverflowError``, which would end the thread.

This module imports nothing of procsup, so any layer may use it.
"""

from __future__ import annotations

import math
from typing import Literal, overload

__all__ = ["NO_LIMIT", "WAIT_CAP", "capped", "check_timeout"]

NO_LIMIT = 1e9  # seconds (~31.7 years): a timeout beyond it is no limit, a duration refused
WAIT_CAP = 86_400.0  # seconds a loop waits at most at a time (epoll's limit is ~24.8 days)


def capped(seconds: float | None) -> float:
    """A loop's wait for a deadline ``seconds`` away (None: none), at most ``WAIT_CAP``."""
    return WAIT_CAP if seconds is None else min(seconds, WAIT_CAP)


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
        if math.isnan(timeout) or not 0 <= timeout <= NO_LIMIT or (positive and not timeout):
            raise ValueError(
                f"{name} must be a finite number of seconds {bound} and <= {NO_LIMIT:g}, "
                f"got {timeout!r}"
            )
        return float(timeout)
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {timeout!r}")
    return None if timeout > NO_LIMIT else float(timeout)
