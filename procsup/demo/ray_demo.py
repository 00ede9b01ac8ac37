"""``python -m procsup --backend ray``: the crash scenario on a local two-node Ray cluster.

::

    run_on_ray(view, crash_after)
      ├─ ray.cluster_utils.Cluster: a head node and a "second" node, on this machine
      ├─ RaySupervisor(token=root) ─ spawn: cpu worker on the head; io worker, async heartbeat
      │                               and the native parser on the second node
      ├─ sup.on_event ──────────────▶ "started" (node, pid), "crashed" with the crash record as
      │                               the second node saw it, then "cancelled" (the root's cause)
      ├─ root.wait(), then join each ▶ "finished": every other task, on both nodes, cleaned up
      └─ SIGINT/SIGTERM ────────────▶ the root is cancelled with the signal as its cause (exit 130)

Only this module of the demo imports Ray, and only the public ``procsup.ray`` of procsup's Ray
support; the demo's main imports it once ``--backend ray`` asks for it, Ray being an optional
extra (``procsup[ray]``).

Things that don't work
----------------------
- The rich live table: its rows sample each task's process with psutil, here, which a task on
  another node is not. The Ray demo prints lines (or ``--json`` objects), with each task's node.
- Ray's default health checks: a lost node would take 20-60 s to be noticed. The demo's cluster
  shortens them, as the tests do.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procsup import CancellationToken, CriticalTaskError, TaskCrashedError, TaskEvent
from procsup.demo import tasks
from procsup.demo.view import View

if TYPE_CHECKING:
    from procsup.ray import RaySupervisor

__all__ = ["run_on_ray"]

GRACE = 5.0  # seconds the tasks get to clean up once the root is cancelled
DEADLINE = 120.0  # seconds any join waits at most: far beyond a clean-up
HEALTH = {  # a lost node noticed in about a second, not Ray's 20-60
    "health_check_period_ms": 100,
    "health_check_timeout_ms": 100,
    "health_check_failure_threshold": 10,
    "health_check_initial_delay_ms": 0,
}


def _short(node_id: str | None) -> str:
    return (node_id or "?")[:8]


def run_on_ray(view: View, crash_after: float) -> int:
    """Run the crash scenario on a local two-node cluster; return the exit code (1 after the
    crash, 130 after Ctrl-C, 0 if nothing failed)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray starts
    import ray
    from ray.cluster_utils import Cluster

    from procsup.ray import RaySupervisor

    view.event("begin", "starting a local Ray cluster: a head node and a second node")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"head": 1},
            "include_dashboard": False,
            "_system_config": HEALTH,
        },
    )
    try:
        second = cluster.add_node(num_cpus=2, resources={"second": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        names = {cluster.head_node.node_id: "head", second.node_id: "second"}
        view.event(
            "cluster",
            ", ".join(f"{name} node {_short(node)}" for node, name in names.items()),
            nodes=names,
        )
        root = CancellationToken()
        with RaySupervisor(token=root, grace_period=GRACE) as sup:
            sup.install_signal_handlers()
            return _story(view, sup, root, names, crash_after)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _story(
    view: View,
    sup: RaySupervisor,
    root: CancellationToken,
    names: dict[str, str],
    crash_after: float,
) -> int:
    plan: list[tuple[Callable[..., Any], str, tuple[Any, ...], dict[str, float]]] = [
        (tasks.cpu_worker, "cpu worker", (), {"head": 1}),
        (tasks.io_worker, "io worker", (), {"second": 1}),
        (tasks.async_heartbeat, "async heartbeat", (), {"second": 1}),
        (tasks.native_parser, "native parser", (crash_after,), {"second": 1}),
    ]
    told = threading.Lock()  # outcomes come on procsup's thread, starts on this one
    cancelled = [False]

    def tell_cancelled() -> None:
        if not cancelled[0]:
            cancelled[0] = True
            view.event("cancelled", f"root token cancelled; cause: {root.cause}")

    def tell(event: TaskEvent) -> None:
        # Only the culprit's outcome: a sibling that ends at once on its token (the heartbeat)
        # may be published first, since a failure waits for every node to have seen the cancel.
        if event.kind in ("crashed", "failed") and event.error is not None:
            with told:
                view.event(event.kind, event.detail, record=_record(event.error, names))
                if root.is_cancelled():
                    tell_cancelled()

    handles: dict[str, Any] = {}
    remove = sup.on_event(tell)
    try:
        for fn, description, args, resources in plan:
            handle = handles[description] = sup.spawn(fn, description, args, resources=resources)
            node = handle.node_id
            with told:
                view.event(
                    "started",
                    f"{description} on the {names.get(node or '', '?')} node ({_short(node)}), "
                    f"pid {handle.pid}",
                    node=node,
                    pid=handle.pid,
                )
        root.wait()
        failure: CriticalTaskError | None = None
        if (root.cause or "").startswith("Supervisor received"):  # Ctrl-C: no task to tell it
            with told:
                tell_cancelled()
        for description, handle in handles.items():
            try:
                value = handle.join(DEADLINE)
            except CriticalTaskError as exc:
                failure = failure or exc
                continue
            node = names.get(handle.node_id or "", "?")
            view.event("finished", f"{description} ({node} node, pid {handle.pid}): {value}")

    finally:
        remove()
    if failure is not None:
        view.event("exit", f"exit 1: {str(failure).splitlines()[0]}; every other task, on both "
                   "nodes, shut down gracefully")  # fmt: skip
        return 1
    cause = root.cause or ""
    code = 130 if "SIGINT" in cause else 0
    view.event("exit", f"exit {code}: {cause}")
    return code


def _record(error: CriticalTaskError, names: dict[str, str]) -> dict[str, Any]:
    """The crash record, as the node saw it."""
    record: dict[str, Any] = {"task": error.description, "pid": error.pid}
    record["exit code"] = error.exitcode
    if isinstance(error, TaskCrashedError):
        record["signal"] = error.signal
        if error.wall_time is not None:
            record["wall time"] = f"{error.wall_time:.2f} s"
        if error.peak_rss is not None:
            record["peak RSS"] = f"{error.peak_rss / 2**20:.1f} MiB"
        if error.stderr_tail:
            record["stderr tail"] = "\n".join(error.stderr_tail.splitlines()[:6])
    for note in getattr(error, "__notes__", []):
        if note.startswith("ran on Ray node "):  # "ran on Ray node <id> (<ip>), pid <pid>"
            node_id = note.split()[4]
            record["node"] = f"the {names.get(node_id, '?')} node: {node_id}"
    return record
