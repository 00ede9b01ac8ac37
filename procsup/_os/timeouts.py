"""The one meaning of a timeout, for every public call that takes one.

``join``, ``stop``, ``stop_async``, ``shutdown``, ``EventStream.get``, ``spawn(timeout=...)`` and
``Supervisor(grace_period=...)`` (which must also be finite) validate theirs here, and
``CancellationToken.wait`` with the same rules, so they agree:

- ``None`` or ``math.inf``: no limit (wait forever; a run may take as long as it likes);
- ``0``: no time at all (a wait polls once; a run is timed out as it starts);
- any other number ``>= 0``: that many seconds;
- a negative number or NaN: ``ValueError``; anything else that is not an ``int`` or ``float``
  (``bool`` and numeric strings included): ``TypeError``.

This module imports nothing of procsup, so any layer may use it.
"""

from __future__ import annotations

import math

__all__ = ["check_timeout"]


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """Validate a timeout in seconds: ``None`` or infinity mean no limit, 0 means do not block.

    Returns:
        The timeout as a float, or None for no limit.

    Raises:
        TypeError: ``timeout`` is not None, an int or a float (``True`` is refused too).
        ValueError: ``timeout`` is negative or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)
