"""procsup on a Ray cluster: the same critical tasks, on any node, supervised from the driver.

Installed with the extra ``procsup[ray]``; ``import procsup`` never imports Ray.

::

    driver process                                   each node that runs a task
    ──────────────                                   ──────────────────────────
    RaySupervisor ─ spawn() ─▶ Lifecycle ─▶ RayBackend ─ agent.start ─▶ Agent (a Ray actor) ─▶
      restarts, timeouts, status, events,             procsup's local backend: the zygote forks
      the handle: the local code, unchanged           the task; its supervision thread reaps it,
      (procsup._supervision)                          classifies it, records a crash
                                ◀── outcome ────────── (signal, exit code, stderr tail)
      the parent is cancelled before join() reports a failure, on every node
    TokenHub (a Ray actor for the driver's lifetime) ◀─ long polls ─ agents: cancellations both
                                                       ways; a hub lost ─▶ the agent stops all

See ``procsup._ray`` for the parts, and the README for the contract.

Things that don't work
----------------------
- A token in ``args``: tokens are shared memory on one machine (``procsup._token``); each task
  gets its own token of the driver's tree as its first argument, and makes children of it.
- Ray APIs inside a task: a task is a process under procsup's zygote on the node, not a Ray
  worker (that is what lets its signal and exit code be observed).
- Ray Client (``ray://`` addresses): the hub is pinned to the driver's node, which a client
  driver does not have.
"""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar, overload

try:
    import ray
except ImportError as _exc:  # pragma: no cover - the extra is missing
    raise ImportError("procsup.ray needs Ray: pip install 'procsup[ray]'") from _exc

from procsup._os.timeouts import check_timeout
from procsup._os.tree import KILL_WAIT, REAP_DEADLINE
from procsup._ray.backend import RayBackend
from procsup._ray.messages import NodeInfo
from procsup._ray.options import RayTaskOptions, check_placement
from procsup._supervision.frontend import Frontend
from procsup._supervision.handle import CriticalTaskExecutionHandle
from procsup._supervision.options import RestartPolicy, TaskOptions, check_options, check_preload
from procsup._supervision.status import TaskSnapshot
from procsup._token.token import CancellationToken

__all__ = ["NodeInfo", "RaySupervisor"]

T = TypeVar("T")


class RaySupervisor(Frontend):
    """Starts critical tasks on the nodes of a Ray cluster and supervises them from this driver.

    Each task runs in a process of its own on a node, under procsup's agent there (one Ray actor
    per node), and receives a ``CancellationToken`` that is a child of its parent token in this
    driver's tree: cancelling an ancestor here reaches it on its node, and its cancelling its own
    token reaches the parent's view of it here. Outcomes are a local supervisor's (a value,
    ``TaskFailedError`` with the task's frames, ``TaskPanickedError``, ``TaskCrashedError`` with
    the signal, exit code and crash record seen on the node); a node or agent lost before the
    outcome is a ``TaskCrashedError`` naming the node, its ``signal`` None, and its parent
    cancelled. Restart policies and timeouts are decided here, by the same code as locally.
    Nothing outlives the driver: if it exits or dies, every task on every node is cancelled,
    then stopped after ``grace_period`` seconds.

    Args:
        address: Where to connect when Ray is not initialized yet: ``ray.init(address=address,
            **init_kwargs)`` (None: a local Ray, as ``ray.init()`` starts one). Ignored when
            ``ray.is_initialized()``: the connected Ray is used.
        token: The root token; tasks spawned without a parent are its children. A new root if
            None.
        grace_period: Seconds ``shutdown()`` gives tasks to honour cancellation before
            escalating, and tasks get after their driver or agent dies: a finite number >= 0.
        init_kwargs: More keyword arguments for ``ray.init``, or None.
        preload: Modules each node's zygote imports once, before forking tasks.

    Raises:
        TypeError: a wrong type (``token``, ``grace_period``, ``init_kwargs``, ``preload``).
        ValueError: a negative, NaN or infinite ``grace_period``.
        ModuleNotFoundError: a ``preload`` module cannot be found here.
        RuntimeError: the token hub could not start on the cluster.
    """

    _NAME: ClassVar[str] = "RaySupervisor"
    _DEFAULT_OPTIONS: ClassVar[TaskOptions] = RayTaskOptions()
    _backend: RayBackend

    def __init__(
        self,
        address: str | None = None,
        *,
        token: CancellationToken | None = None,
        grace_period: float = 5.0,
        init_kwargs: Mapping[str, Any] | None = None,
        preload: Iterable[str] = (),
    ) -> None:
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(
                f"token must be a CancellationToken or None, not {type(token).__name__}"
            )
        if init_kwargs is not None and not isinstance(init_kwargs, Mapping):
            raise TypeError(f"init_kwargs must be a mapping or None, not {type(init_kwargs)}")
        grace = check_timeout(grace_period, "grace_period", finite=True)
        modules = check_preload(preload)
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **dict(init_kwargs or {}))
        _register_atexit()  # after ray.init's own hook, so that ours runs first
        try:
            backend = RayBackend(grace, modules)
        except BaseException:
            if self._owns_ray:
                ray.shutdown()
            raise
        super().__init__(backend, token)
        self._joined = False  # set once (under _lock) by the shutdown() that lets agents go
        _RUNNING.add(self)

    @overload
    def spawn(
        self,
        task_fn: Callable[..., Awaitable[T]],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        *,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        timeout: float | None = None,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        node_id: str | None = None,
    ) -> CriticalTaskExecutionHandle[T]: ...

    @overload
    def spawn(
        self,
        task_fn: Callable[..., T],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        *,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        timeout: float | None = None,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        node_id: str | None = None,
    ) -> CriticalTaskExecutionHandle[T]: ...

    def spawn(
        self,
        task_fn: Callable[..., Any],
        description: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        parent_token: CancellationToken | None = None,
        *,
        restart: RestartPolicy = "temporary",
        max_restarts: int = 3,
        period: float = 5.0,
        timeout: float | None = None,
        memory_limit: int | None = None,
        cpu_time_limit: float | None = None,
        capture_output: bool = False,
        backoff: tuple[float, float] = (0.05, 2.0),
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        node_id: str | None = None,
    ) -> CriticalTaskExecutionHandle[Any]:
        """Start ``task_fn(token, *args, **kwargs)`` as a critical task on a node; its handle.

        ``task_fn``, ``args`` and ``kwargs`` travel to the node pickled: by reference when they
        can be named by their module, else by value (cloudpickle: lambdas, closures, the
        driver's ``__main__``); tokens cannot be among the args. The handle's ``node_id`` and
        ``pid`` say where the current run is.

        Args:
            task_fn, description, args, kwargs, parent_token, restart, max_restarts, period,
                timeout, memory_limit, cpu_time_limit, capture_output, backoff: As for
                ``procsup.Supervisor.spawn`` (limits are applied on the node; captured output is
                printed by the agent there, and Ray forwards it to the driver).
            num_cpus: CPUs the task needs: only nodes with at least that many take it.
            resources: Custom Ray resources the task needs (``{"gpu_box": 1}``), or None; only
                nodes that have them take it. Among the nodes that fit, the one least loaded by
                this supervisor's runs is chosen; Ray's own accounting is not charged.
            node_id: Pin the task to this Ray node (hex id), or None.

        Raises:
            TypeError, ValueError: a bad argument, a token among the args, or no alive node has
                what the task asks for; no process is started then.
            ImportError: a ``preload`` module is broken on the node.
            RuntimeError: after ``shutdown()``, or the node did not answer.
        """
        options = check_options(
            restart, max_restarts, period, backoff, memory_limit, cpu_time_limit, timeout,
            capture_output,
        )  # fmt: skip
        cpus, pairs, node = check_placement(num_cpus, resources, node_id)
        ray_options = RayTaskOptions(
            **{field.name: getattr(options, field.name) for field in dataclasses.fields(options)},
            num_cpus=cpus,
            resources=pairs,
            node_id=node,
        )
        return self._spawn(task_fn, description, args, kwargs, parent_token, ray_options)

    def tasks(self) -> list[TaskSnapshot]:
        """Snapshots of every task not finally done, oldest first (RSS and CPU asked of each
        task's node; None when a node does not answer within two seconds)."""
        self._backend.prefetch_facts()  # every node at once, not one round trip per task
        return super().tasks()

    def nodes(self) -> list[NodeInfo]:
        """The nodes where this supervisor has an agent up (its node id, IP, host, agent pid)."""
        return self._backend.agents()

    def _shutting_down(self) -> None:
        _RUNNING.discard(self)

    def _finish(self) -> None:
        """Let the agents and the token hub go (and disconnect from Ray if this supervisor
        connected); a second shutdown (a second Ctrl-C) only escalates."""
        with self._lock:
            joined, self._joined = self._joined, True
        if not joined:
            backend = self._backend
            backend.join(KILL_WAIT if backend.live() else REAP_DEADLINE)
            if self._owns_ray:
                ray.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{len(self._backend.live())} live tasks"
        return f"<procsup.ray.RaySupervisor {state}>"


RaySupervisor.__module__ = "procsup.ray"

_RUNNING: set[RaySupervisor] = set()
_registered = False


def _register_atexit() -> None:
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_shutdown_all)


def _shutdown_all() -> None:
    for sup in list(_RUNNING):
        sup.shutdown()
