"""What ``Supervisor.spawn`` accepts beyond the task itself, checked before any process starts."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from typing import Literal

from procsup._os.timeouts import check_timeout
from procsup._token.token import CancellationToken

__all__ = [
    "DEFAULT",
    "RESTART_POLICIES",
    "RestartPolicy",
    "TaskOptions",
    "check_call",
    "check_options",
    "check_preload",
]

RestartPolicy = Literal["temporary", "transient", "permanent"]
RESTART_POLICIES: tuple[RestartPolicy, ...] = ("temporary", "transient", "permanent")
_RLIM_MAX = 2**63 - 1  # the largest limit setrlimit() takes from Python


@dataclass(frozen=True)
class TaskOptions:
    """A task's restart policy, limits and output handling; every field already validated.

    Invariants: ``max_restarts >= 0``; ``period`` and ``cpu_time_limit`` are positive finite floats
    (``cpu_time_limit`` may be None); ``timeout`` a finite float ``>= 0`` or None (no limit);
    ``memory_limit`` a positive int or None; ``0 <= backoff[0] <= backoff[1]``.
    """

    restart: RestartPolicy = "temporary"
    max_restarts: int = 3
    period: float = 5.0
    backoff: tuple[float, float] = (0.05, 2.0)
    memory_limit: int | None = None
    cpu_time_limit: float | None = None
    timeout: float | None = None
    capture_output: bool = False
    # Not a spawn() argument: a run whose owner reports its end (an executor's worker, whose
    # crash is its item's outcome) is logged at DEBUG by the backend, not ERROR.
    quiet: bool = False

    @property
    def restarts(self) -> bool:
        """True if some outcome of a run can lead to another run."""
        return self.restart != "temporary"


DEFAULT = TaskOptions()


def check_call(
    task_fn: object, parent: object, description: object, args: object, kwargs: object
) -> None:
    """Check what a task is started with; TypeError naming the culprit (no process started).

    Whether ``task_fn`` can travel to where it runs is the backend's to judge
    (``procsup._supervision.local``).
    """
    if not callable(task_fn):
        raise TypeError(f"task_fn must be callable, not {type(task_fn).__name__}")
    if not isinstance(parent, CancellationToken):
        raise TypeError(f"parent_token must be a CancellationToken, not {type(parent).__name__}")
    if not isinstance(description, str):
        raise TypeError(f"description must be a str, not {type(description).__name__}")
    if not isinstance(args, tuple | list):
        raise TypeError(f"args must be a tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping or None, not {type(kwargs).__name__}")


def check_preload(preload: object) -> list[str]:
    """Check ``Supervisor(preload=...)``: a module name or an iterable of them, each of which
    ``import`` would find. Imports nothing (the zygote imports them, and a package is looked
    into, not run); a submodule of a plain module (``os.path``) is left to the import.

    Raises:
        TypeError: not a str or an iterable of str.
        ModuleNotFoundError: a module is nowhere on ``sys.path`` (a misspelled name); its message
            and ``name`` give the module.
    """
    names = [preload] if isinstance(preload, str) else list(preload)  # type: ignore[call-overload]
    if not all(isinstance(name, str) for name in names):
        raise TypeError("preload must be a module name or an iterable of module names")
    for name in names:
        missing = _missing(name)
        if missing is not None:
            raise ModuleNotFoundError(
                f"Supervisor preload module {name!r} cannot be imported: no module named "
                f"{missing!r}",
                name=name,
            )
    return names


def _missing(name: str) -> str | None:
    """The first of ``name``'s packages or itself that ``import`` would not find, or None."""
    path: Sequence[str] | None = None  # where the next part is looked for: None is sys.path
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        module = sys.modules.get(prefix)
        if module is not None:
            path = getattr(module, "__path__", None)
        else:
            spec = _find_spec(prefix, path)
            if spec is None:
                return prefix
            path = spec.submodule_search_locations
        if path is None:  # a plain module: only importing it would tell what it holds
            return None
    return None


def _find_spec(name: str, path: Sequence[str] | None) -> ModuleSpec | None:
    # What ``import`` asks, minus running any module: each finder on sys.meta_path in turn.
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = None if find_spec is None else find_spec(name, path, None)
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return None


def check_options(
    restart: object = "temporary",
    max_restarts: object = 3,
    period: object = 5.0,
    backoff: object = (0.05, 2.0),
    memory_limit: object = None,
    cpu_time_limit: object = None,
    timeout: object = None,
    capture_output: object = False,
) -> TaskOptions:
    """Validate ``spawn()``'s keyword arguments; TypeError or ValueError names the culprit."""
    if restart not in RESTART_POLICIES:
        raise ValueError(f"restart must be one of {list(RESTART_POLICIES)}, got {restart!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
        raise TypeError(f"max_restarts must be an int, not {type(max_restarts).__name__}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if not isinstance(backoff, tuple | list) or len(backoff) != 2:
        raise TypeError(f"backoff must be a pair (first, most) of seconds, not {backoff!r}")
    first = check_timeout(backoff[0], "backoff[0]", finite=True)
    most = check_timeout(backoff[1], "backoff[1]", finite=True)
    if most < first:
        raise ValueError(f"backoff must be (first, most) with first <= most, got {backoff!r}")
    if memory_limit is not None:
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int):
            kind = type(memory_limit).__name__
            raise TypeError(f"memory_limit must be an int (bytes), not {kind}")
        if not 0 < memory_limit <= _RLIM_MAX:  # setrlimit takes a signed 64-bit number
            raise ValueError(f"memory_limit must be > 0 and < 2**63 bytes, got {memory_limit}")
    if not isinstance(capture_output, bool):
        raise TypeError(f"capture_output must be a bool, not {type(capture_output).__name__}")
    return TaskOptions(
        restart=restart,
        max_restarts=max_restarts,
        period=check_timeout(period, "period", finite=True, positive=True),
        backoff=(first, most),
        memory_limit=memory_limit,
        cpu_time_limit=(
            None
            if cpu_time_limit is None
            else check_timeout(cpu_time_limit, "cpu_time_limit", finite=True, positive=True)
        ),
        timeout=check_timeout(timeout),
        capture_output=capture_output,
    )
