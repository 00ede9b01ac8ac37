"""The demo's stress scenario: many short critical tasks through one supervisor.

Latency is measured per task from just before ``spawn()`` to the value coming back from
``await join_async()``, with at most ``concurrency`` tasks in flight; throughput is tasks per
second of wall time for the whole run. Spawns run on the event loop thread, so a figure includes
the loop's own scheduling, as it would for an asyncio application.
"""

from __future__ import annotations

import asyncio
import time

from procsup import CriticalTaskError, Supervisor
from procsup.demo.tasks import stress_task
from procsup.demo.view import View

__all__ = ["percentiles", "run_stress"]

_PROGRESS_EVERY = 100  # tasks between "progress" events


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``samples`` by nearest rank (each one a measured value)."""
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1]}


async def run_stress(view: View, sup: Supervisor, count: int, concurrency: int) -> bool:
    """Run ``count`` trivial tasks, report a "stress" event; True if every one returned its value.

    Stops starting tasks once the supervisor's root token is cancelled (Ctrl-C, or a failure).
    """
    window = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    problems: list[str] = []

    async def one(number: int) -> None:
        async with window:
            if sup.token.is_cancelled():
                return
            began = time.perf_counter()
            handle = sup.spawn(stress_task, f"stress #{number}", args=(number,))
            try:
                value = await handle.join_async()
            except CriticalTaskError as exc:
                problems.append(str(exc))
                view.event("failed", str(exc), task=exc.description, pid=exc.pid)
                return
            latencies.append(time.perf_counter() - began)
            if value != number * number:
                problems.append(f"task {number} returned {value!r}")
            if len(latencies) % _PROGRESS_EVERY == 0:
                text = f"{len(latencies)}/{count} tasks done"
                view.event("progress", text, done=len(latencies), total=count)

    began = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    elapsed = time.perf_counter() - began
    done = len(latencies)
    stats = percentiles(latencies)
    record = {
        "tasks": f"{done} of {count} (at most {concurrency} in flight)",
        "wall time": f"{elapsed:.2f} s",
        "throughput": f"{done / elapsed:.0f} tasks/s",
        **{name: f"{value * 1000:.1f} ms" for name, value in stats.items()},
    }
    view.event(
        "stress",
        f"{done} tasks in {elapsed:.2f} s: {done / elapsed:.0f} tasks/s, latency p50 "
        f"{stats['p50'] * 1000:.1f} ms, p99 {stats['p99'] * 1000:.1f} ms",
        completed=done,
        total=count,
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        throughput=round(done / elapsed, 1),
        latency_ms={name: round(value * 1000, 2) for name, value in stats.items()},
        problems=problems[:10],
        record=record,
    )
    return not problems and done == count
