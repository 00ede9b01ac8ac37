"""What ``RaySupervisor.spawn`` accepts beyond a local spawn (where a run may go), and refuses.

The lifecycle hands a run's options to the backend untouched (``RunSpec.options``), so the Ray
options ride in a ``TaskOptions`` subclass and nothing above the runtime seam knows of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from procsup._supervision.options import TaskOptions
from procsup._token.token import CancellationToken

__all__ = ["RayTaskOptions", "check_placement", "demand", "refuse_tokens"]


@dataclass(frozen=True)
class RayTaskOptions(TaskOptions):
    """``TaskOptions`` plus where a run may go; every field already validated.

    Invariants: ``num_cpus`` is a finite float ``>= 0``; ``resources`` pairs of a name other than
    "CPU" and a finite float ``>= 0``, sorted by name; ``node_id`` a hex Ray node id or None.
    """

    num_cpus: float = 1.0
    resources: tuple[tuple[str, float], ...] = ()
    node_id: str | None = None


def check_placement(
    num_cpus: object, resources: object, node_id: object
) -> tuple[float, tuple[tuple[str, float], ...], str | None]:
    """Validate ``spawn``'s placement arguments; TypeError or ValueError names the culprit."""
    cpus = _amount(num_cpus, "num_cpus")
    pairs: list[tuple[str, float]] = []
    if resources is not None:
        if not isinstance(resources, Mapping):
            kind = type(resources).__name__
            raise TypeError(f"resources must be a mapping of names to amounts or None, not {kind}")
        for name, amount in resources.items():
            if not isinstance(name, str):
                raise TypeError(f"resources names must be str, not {type(name).__name__}")
            if name == "CPU":
                raise ValueError("resources must not name 'CPU': use num_cpus")
            pairs.append((name, _amount(amount, f"resources[{name!r}]")))
    if node_id is not None and not isinstance(node_id, str):
        raise TypeError(f"node_id must be a Ray node id (hex str) or None, not {type(node_id)}")
    return cpus, tuple(sorted(pairs)), node_id


def _amount(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def demand(options: TaskOptions) -> tuple[dict[str, float], str | None]:
    """What a run asks of its node (resources by name) and the node it is pinned to, if any."""
    if not isinstance(options, RayTaskOptions):
        options = RayTaskOptions()
    amounts = {"CPU": options.num_cpus, **dict(options.resources)}
    return {name: amount for name, amount in amounts.items() if amount > 0}, options.node_id


def refuse_tokens(description: str, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    """TypeError for a token among the args: tokens are shared memory on one machine, and cross
    into a process only as it starts there (``procsup._token.token``), so a token of the driver's
    tree cannot be mapped on another node. The task's own token (its first argument) is the
    bridge; a task that needs more makes children of it."""
    for value in _shallow(args, kwargs):
        if isinstance(value, CancellationToken):
            raise TypeError(
                f"critical task {description!r}: a CancellationToken cannot be passed to a "
                "task on Ray in args or kwargs (it is shared memory on one machine); the task's "
                "own token, its first argument, is a child of parent_token in the driver's tree"
            )


def _shallow(args: Iterable[Any], kwargs: Mapping[str, Any]) -> Iterable[Any]:
    """The arguments and what lists, tuples, sets and dicts among them hold (one level down)."""
    for value in (*args, *kwargs.values()):
        yield value
        if isinstance(value, list | tuple | set | frozenset):
            yield from value
        elif isinstance(value, dict):
            yield from value.values()
