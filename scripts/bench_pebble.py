"""pebble's side of scripts/bench.py, apart from ``bench_tasks``: pebble imports asyncio, and the
zygote imports a task's module, so a task module importing pebble would load asyncio there too."""

from __future__ import annotations

from typing import Any

from pebble import ProcessPool, concurrent


@concurrent.process
def trivial_pebble() -> int:
    return 1


def pool(workers: int) -> Any:  # pebble's close() and join() are untyped
    """A pebble process pool (reused across measurements, as the executor bench needs)."""
    return ProcessPool(max_workers=workers)
