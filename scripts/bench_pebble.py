"""pebble's side of scripts/bench.py, apart from ``bench_tasks``: pebble imports asyncio, and the
zygote imports a task's module, so a task module importing pebble would load asyncio there too."""

from __future__ import annotations

from pebble import concurrent


@concurrent.process
def trivial_pebble() -> int:
    return 1
