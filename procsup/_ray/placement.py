"""Choosing a run's node from what it asks for: ``num_cpus``, ``resources``, ``node_id``.

::

    start(spec) ─ choose(demand, node_id) ─┬─ node_id given: that node, if alive and big enough
                                           └─ else: the alive nodes whose totals cover the demand,
                                              the least loaded by this supervisor's own runs
                  charge(node, demand) ... release(node, demand) when the run's outcome is in

The table of alive nodes is ``ray.nodes()``, read again when it is older than ``REFRESH`` seconds,
when a node named is not in it, when nothing fits, or after an agent was lost: a start does not
pay a round trip to Ray's control store.

Things that don't work
----------------------
- Reserving the demand in Ray's own accounting (a placement group per run): that is a round trip
  to the control store and a wait for the bundle on every start, and a restart would wait behind
  other jobs' demands. Runs are placed by this supervisor, which spreads its own runs by what they
  ask for and never queues one: if every node that has the resources is fully used by this
  supervisor's runs, the least used of them takes it (other Ray work does not see these
  reservations; give the agents' nodes' resources to procsup, or leave headroom).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping

import ray

__all__ = ["REFRESH", "Placement"]

REFRESH = 5.0  # seconds a node table is trusted for


class Placement:
    """The node table and this supervisor's load on each node.

    Invariants (under ``_lock``): ``_nodes`` maps every node alive at the last refresh to its
    total resources; ``_used`` the resources charged by runs whose outcome is not in yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, float]] = {}
        self._stamp = -math.inf
        self._used: dict[str, dict[str, float]] = {}

    def invalidate(self) -> None:
        """Read the node table again before the next choice (an agent or node was lost)."""
        with self._lock:
            self._stamp = -math.inf

    def _refresh(self) -> None:
        self._nodes = {
            node["NodeID"]: dict(node.get("Resources", {}))
            for node in ray.nodes()
            if node.get("Alive")
        }
        self._stamp = time.monotonic()

    def choose(self, demand: Mapping[str, float], node_id: str | None) -> str:
        """The node a run asking for ``demand`` starts on.

        Raises:
            ValueError: ``node_id`` is not an alive node, or no alive node (``node_id``, if
                given) has the resources asked for.
        """
        with self._lock:
            if time.monotonic() - self._stamp > REFRESH:
                self._refresh()
            for attempt in range(2):
                if node_id is not None:
                    totals = self._nodes.get(node_id)
                    if totals is not None:
                        missing = _missing(totals, demand)
                        if missing is None:
                            return node_id
                        if attempt:
                            raise ValueError(f"Ray node {node_id} has {missing}")
                    elif attempt:
                        raise ValueError(f"no alive Ray node has the id {node_id!r}")
                else:
                    fitting = [n for n, totals in self._nodes.items() if _fits(totals, demand)]
                    if fitting:
                        return min(fitting, key=lambda n: self._load(n, demand))
                    if attempt:
                        alive = len(self._nodes)
                        raise ValueError(
                            f"none of the {alive} alive Ray nodes has {_show(demand)} in total"
                        )
                self._refresh()  # perhaps a node joined (or came back) since the last look
        raise AssertionError("unreachable")

    def _load(self, node: str, demand: Mapping[str, float]) -> float:
        """How full ``node`` would be with ``demand`` on it: the largest share of any resource."""
        totals, used = self._nodes[node], self._used.get(node, {})
        shares = [(used.get(k, 0.0) + v) / totals[k] for k, v in demand.items() if v > 0]
        return max(shares, default=0.0)

    def charge(self, node: str, demand: Mapping[str, float]) -> None:
        """A run asking for ``demand`` started on ``node``."""
        with self._lock:
            used = self._used.setdefault(node, {})
            for key, amount in demand.items():
                used[key] = used.get(key, 0.0) + amount

    def release(self, node: str, demand: Mapping[str, float]) -> None:
        """That run's outcome is in."""
        with self._lock:
            used = self._used.get(node, {})
            for key, amount in demand.items():
                used[key] = max(used.get(key, 0.0) - amount, 0.0)


def _fits(totals: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    return _missing(totals, demand) is None


def _missing(totals: Mapping[str, float], demand: Mapping[str, float]) -> str | None:
    """None if ``totals`` cover ``demand``, else what is short, in words."""
    short = {k: totals.get(k, 0.0) for k, v in demand.items() if v > 0 and totals.get(k, 0.0) < v}
    if not short:
        return None
    asked = {k: demand[k] for k in short}
    return f"{_show(short, zeros=True)} in total, and the task asks for {_show(asked)}"


def _show(amounts: Mapping[str, float], zeros: bool = False) -> str:
    shown = [f"{v:g} {k}" for k, v in sorted(amounts.items()) if zeros or v > 0]
    return ", ".join(shown) or "nothing"
