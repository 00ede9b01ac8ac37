"""The ``ray`` section of scripts/bench.py: procsup.ray against Ray's own primitives, same run.

A local two-node ``ray.cluster_utils.Cluster`` (the head node and a "second" node, on this
machine) with Ray's health checks shortened as the tests do. Every measurement is against the
second node, and each floor is measured on that node too, interleaved where it can be:

- start to result: ``RaySupervisor.spawn(trivial).join()`` against ``ray.get(actor.method
  .remote())`` on a warm actor; a local ``Supervisor`` start to result is shown beside it, since
  a RaySupervisor start is one of those on the node plus Ray's messages;
- cancel propagation: ``token.cancel()`` in the driver until the task blocked in ``wait()`` on
  the second node wakes (its CLOCK_MONOTONIC stamp, shared by every process of the machine);
- crash detection: a task segfaults on the second node until its parent token is cancelled in
  the driver, against an actor segfaulting there until ``ray.get`` raises ``ActorDiedError``.

Task and actor bodies are in ``bench_ray_tasks`` (the nodes import it: this directory is put on
their ``PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import os
import select
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HEALTH = {
    "health_check_period_ms": 100,
    "health_check_timeout_ms": 100,
    "health_check_failure_threshold": 10,
    "health_check_initial_delay_ms": 0,
}
SECOND = {"second": 1}
DEADLINE = 60.0

RowMaker = Callable[..., Any]


class Fifo:
    """A named pipe: tasks on any node of this machine's cluster write lines to it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # never EOF between writers
        self._buffer = b""

    def line(self) -> str:
        while b"\n" not in self._buffer:
            if not select.select([self._read], [], [], DEADLINE)[0]:
                raise TimeoutError("no line from the task")
            self._buffer += os.read(self._read, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self._read)
        os.close(self._hold)


@contextlib.contextmanager
def _cluster() -> Iterator[Any]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    here = os.path.dirname(os.path.abspath(__file__))
    path = [here, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in path if p)  # for the nodes' workers
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "include_dashboard": False,
            "_system_config": HEALTH,
        },
    )
    try:
        cluster.add_node(num_cpus=1, resources=SECOND)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def ray_remote_echo(cls: type) -> Any:
    """The Echo actor class (imported Ray-free by the tasks' module: see bench_ray_tasks)."""
    import ray

    return ray.remote(num_cpus=0)(cls)


def ray_section(quick: bool, row: RowMaker) -> list[Any]:
    """The rows; ``row`` is bench.Row."""
    import bench_ray_tasks as tasks

    from procsup import CancellationToken, Supervisor, TaskCrashedError
    from procsup.ray import RaySupervisor

    echo = ray_remote_echo(tasks.Echo)
    runs = 40 if quick else 200
    crashes = 8 if quick else 25
    rows = []
    with _cluster() as ray, tempfile.TemporaryDirectory() as tmp:
        actor = echo.options(resources={"second": 0.001}).remote()
        ray.get(actor.ping.remote())
        with RaySupervisor(grace_period=2.0) as sup, Supervisor() as local:
            for _ in range(3):  # warm: the agent, its zygote, the task module there
                sup.spawn(tasks.trivial, "warm", resources=SECOND).join(DEADLINE)
                local.spawn(tasks.trivial, "warm").join(DEADLINE)
            start: dict[str, list[float]] = {"ray": [], "actor": [], "local": []}
            for _ in range(runs):  # interleaved: load changes hit every one alike
                t = time.perf_counter()
                sup.spawn(tasks.trivial, "trivial", resources=SECOND).join(DEADLINE)
                start["ray"].append(time.perf_counter() - t)
                t = time.perf_counter()
                ray.get(actor.ping.remote())
                start["actor"].append(time.perf_counter() - t)
                t = time.perf_counter()
                local.spawn(tasks.trivial, "trivial").join(DEADLINE)
                start["local"].append(time.perf_counter() - t)
            ms = {name: statistics.median(values) * 1e3 for name, values in start.items()}
            actor_call = "ray.get(actor.method.remote()), warm actor"
            rows += [
                row("ray: trivial task, start to result, second node", ms["ray"], "ms",
                    ms["actor"], actor_call, 3.0),
                row("ray: the same through a local Supervisor (no Ray)", ms["local"], "ms",
                    ms["actor"], actor_call),
            ]  # fmt: skip

            fifo = Fifo(Path(tmp) / "stamps")
            lags = []
            for _ in range(runs):
                handle = sup.spawn(tasks.stamp_on_cancel, "waiter", (fifo.path,), resources=SECOND)
                assert fifo.line() == "ready"
                t = time.monotonic()
                handle.cancel()
                lags.append((float(fifo.line()) - t) * 1e3)
                handle.join(DEADLINE)
            rows += [
                row("ray: cancel in the driver until a task wakes on node 2, p50",
                    statistics.median(lags), "ms", ms["actor"], actor_call, 20.0, absolute=True),
                row("ray: cancel in the driver until a task wakes on node 2, p99",
                    _percentile(lags, 0.99), "ms", ms["actor"], actor_call),
            ]  # fmt: skip

            go = Path(tmp) / "go"
            os.mkfifo(go)
            go_fd = os.open(go, os.O_RDWR)  # both ends: a reader never waits for a writer
            ours, theirs = [], []
            for _ in range(crashes):
                parent = CancellationToken()
                handle = sup.spawn(
                    tasks.segfault_on_go, "crasher", (str(go), fifo.path), parent_token=parent,
                    resources=SECOND,
                )  # fmt: skip
                assert fifo.line() == "ready"
                t = time.perf_counter()
                os.write(go_fd, b"g")
                parent.wait(DEADLINE)
                ours.append((time.perf_counter() - t) * 1e3)
                with contextlib.suppress(TaskCrashedError):
                    handle.join(DEADLINE)
                victim = echo.options(resources={"second": 0.001}).remote()
                ray.get(victim.ping.remote())
                ref = victim.segfault_on_go.remote(str(go), fifo.path)
                assert fifo.line() == "ready"
                t = time.perf_counter()
                os.write(go_fd, b"g")
                with contextlib.suppress(ray.exceptions.RayActorError):
                    ray.get(ref, timeout=DEADLINE)
                theirs.append((time.perf_counter() - t) * 1e3)
            os.close(go_fd)
            fifo.close()
            rows.append(
                row("ray: SIGSEGV on node 2 until the parent token is cancelled",
                    statistics.median(ours), "ms", statistics.median(theirs),
                    "Ray's ActorDiedError, same crash", 1.5)
            )  # fmt: skip
    return rows


if __name__ == "__main__":  # pragma: no cover - run through scripts/bench.py
    sys.exit("run: python scripts/bench.py ray")
