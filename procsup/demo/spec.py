"""What a scenario is made of: one ``Spec`` per task, and the ``Plan`` that lists them.

``procsup.demo.main`` writes the plans; the runner spawns each spec and the event log reads its
restart policy back when it tells a run's failure, restart or escalation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Plan", "Spec"]


@dataclass(frozen=True)
class Spec:
    """One task of a scenario: what runs, under which name, with which ``spawn()`` options."""

    fn: Callable[..., Any]
    description: str
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # restart, max_restarts, period, ...

    @property
    def restart(self) -> str:
        """The task's restart policy."""
        return str(self.options.get("restart", "temporary"))

    def policy(self) -> str:
        """The restart policy and intensity, as they read in ``spawn()``."""
        opts = self.options
        return (
            f"restart={self.restart!r}, max_restarts={opts['max_restarts']}, "
            f"period={opts['period']:g} s"
        )


Plan = Callable[[str, str], list[Spec]]  # (scenario, start method) -> the scenario's tasks
