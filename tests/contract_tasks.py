"""Task functions for the contract and timeout tests: importable, so they pickle under
spawn/forkserver. Every wait has a deadline (``DEADLINE``); handshakes travel over Connections."""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection
from typing import Any

from procsup import CancellationToken
from tests.tasks import DEADLINE

PRELOADED = "tests.contract_preloaded"  # imported by no task module: only a preload brings it


def echo(token: CancellationToken, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Return what the task was given; cancel a token given as ``kwargs["cancel"]``."""
    other = kwargs.pop("cancel", None)
    if other is not None:
        other.cancel("cancelled through kwargs")
    return args, kwargs


def preloaded(token: CancellationToken) -> bool:
    """Whether the module a Supervisor preloads was imported before this task ran."""
    return PRELOADED in sys.modules


def fail_when_told(token: CancellationToken, told: Connection) -> str:
    """Wait for a word on ``told``, then raise with it (a restart's run fails on cue)."""
    if not told.poll(DEADLINE):
        return "never told"
    raise RuntimeError(f"told to fail: {told.recv()}")


def clean_up_when_told(token: CancellationToken, report: Connection, told: Connection) -> str:
    """Say "ready"; once cancelled say "cancelled", then take until told to finish cleaning up."""
    report.send("ready")
    if not token.wait(DEADLINE):
        return "never cancelled"
    report.send("cancelled")
    return "cleaned up" if told.poll(DEADLINE) else "never told"
