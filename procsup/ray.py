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
import concurrent.futures
import dataclasses
import enum
import functools
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

try:
    import ray
except ImportError as _exc:  # pragma: no cover - the extra is missing
    raise ImportError("procsup.ray needs Ray: pip install 'procsup[ray]'") from _exc

from procsup._os.timeouts import check_timeout
from procsup._os.tree import KILL_WAIT, REAP_DEADLINE
from procsup._ray.backend import RayBackend
from procsup._ray.messages import NodeInfo
from procsup._ray.options import RayTaskOptions, check_placement
from procsup._supervision.aio import off_loop
from procsup._supervision.handle import CriticalTaskExecutionHandle
from procsup._supervision.lifecycle import Lifecycle
from procsup._supervision.options import RestartPolicy, check_call, check_options, check_preload
from procsup._supervision.signals import SignalBridge
from procsup._supervision.status import EventStream, StatusHub, TaskEvent, TaskSnapshot
from procsup._token.token import CancellationToken

__all__ = ["NodeInfo", "RaySupervisor"]

T = TypeVar("T")

logger = logging.getLogger("procsup")


class _Default(enum.Enum):
    """``shutdown()``'s default timeout: the supervisor's ``grace_period``."""

    GRACE_PERIOD = "grace_period"

    def __repr__(self) -> str:
        return "GRACE_PERIOD"


GRACE_PERIOD = _Default.GRACE_PERIOD


class RaySupervisor:
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
            self._backend = RayBackend(grace, modules)
        except BaseException:
            if self._owns_ray:
                ray.shutdown()
            raise
        self.token = token if token is not None else CancellationToken()
        self._lock = threading.Lock()  # guards _closed, _joined and _signals
        self._closed = False
        self._joined = False  # set once by the shutdown() that lets the agents and hub go
        self._signals: SignalBridge | None = None
        self._status = StatusHub()
        _RUNNING.add(self)

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` was called (or the token hub was lost)."""
        return self._closed or self._backend.closed

    @property
    def grace_period(self) -> float:
        """Seconds ``shutdown()`` waits for tasks to honour cancellation."""
        return self._backend.grace_period

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

        ``task_fn``, ``args`` and ``kwargs`` travel to the node with Ray's serialization
        (cloudpickle: by reference when their module is importable there, else by value); tokens
        cannot be among the args. The handle's ``node_id`` and ``pid`` say where the current run
        is.

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
        parent = self.token if parent_token is None else parent_token
        return CriticalTaskExecutionHandle._adopt(
            self._launch(task_fn, parent, description, args, kwargs, ray_options)
        )

    async def spawn_async(
        self, task_fn: Callable[..., Any], description: str, **spawn_args: Any
    ) -> CriticalTaskExecutionHandle[Any]:
        """``spawn()`` from a coroutine, without blocking the event loop (it waits for a node).

        Takes the same arguments and raises the same errors as ``spawn()``. If the awaiting
        coroutine is cancelled meanwhile, the task is still started, then cancelled and detached.
        """
        return await off_loop(functools.partial(self.spawn, task_fn, description, **spawn_args))

    def _launch(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
        options: RayTaskOptions | None = None,
    ) -> Lifecycle:
        """Validate a task, then start its first run (``handle.Runtime``)."""
        check_call(task_fn, parent, description, args, kwargs)
        life = Lifecycle(
            self._backend,
            self._status,
            task_fn,
            parent,
            description,
            args,
            kwargs,
            options or RayTaskOptions(),
        )
        life.start()
        return life

    def tasks(self) -> list[TaskSnapshot]:
        """Snapshots of every task not finally done, oldest first (RSS and CPU asked of each
        task's node; None when a node does not answer within two seconds)."""
        self._backend.prefetch_facts()  # every node at once, not one round trip per task
        return [life.snapshot() for life in self._status.live()]

    def nodes(self) -> list[NodeInfo]:
        """The nodes where this supervisor has an agent up (its node id, IP, host, agent pid)."""
        return self._backend.agents()

    def events(self, maxlen: int = 10_000) -> EventStream:
        """Open a stream of lifecycle events of this supervisor's tasks (see ``TaskEvent``)."""
        return self._status.stream(maxlen)

    def on_event(self, callback: Callable[[TaskEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event; return a function removing it.

        The callback runs on the thread that caused the event (the "procsup-ray" thread for
        outcomes): keep it short. What it raises is logged and dropped.
        """
        return self._status.add_callback(callback)

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM cancel the root token; a second one shuts down (as for
        ``Supervisor.install_signal_handlers``).

        Raises:
            RuntimeError: not called from the main thread, or after ``shutdown()``.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this RaySupervisor has been shut down")
            if self._signals is None:
                self._signals = SignalBridge(self, _SIGNALS)

    def shutdown(self, timeout: float | _Default | None = GRACE_PERIOD) -> None:
        """Cancel the root token and every task, wait, escalate the stragglers on their nodes,
        then let the agents and the token hub go (and disconnect from Ray if this supervisor
        connected).

        Args:
            timeout: Seconds tasks get to honour cancellation before they are sent SIGTERM, then
                SIGKILL, on their nodes. By default ``grace_period``; None waits for as long as
                they take; 0 escalates at once.

        Idempotent. Outcomes stay available on the handles.

        Raises:
            ValueError, TypeError: ``timeout`` is negative, NaN or not a number.
        """
        wait = self.grace_period if timeout is GRACE_PERIOD else check_timeout(timeout)
        with self._lock:
            self._closed = True
            signals = self._signals
        backend = self._backend
        backend.close()
        if signals is not None and signals.uninstall():
            self._signals = None
        _RUNNING.discard(self)
        self.token.cancel("RaySupervisor shut down")
        runs = backend.live()
        while runs:  # again, for any task whose start was under way when we closed
            futures = [run.future for run in runs]
            reason = f"it did not honour cancellation within {wait} s of shutdown"
            ladder = backend.stop(runs, wait, "RaySupervisor shut down", reason)
            pending: set[concurrent.futures.Future[Any]] = set(futures)
            while pending and not ladder.done.done():
                concurrent.futures.wait([*pending, ladder.done], return_when="FIRST_COMPLETED")
                pending = {future for future in pending if not future.done()}
            if pending and not ladder.done.result():
                concurrent.futures.wait(pending, REAP_DEADLINE)
            runs = [run for run in backend.live() if run.future not in futures]
        # A second shutdown (a second Ctrl-C) escalates; only the first lets the actors go.
        with self._lock:
            joined, self._joined = self._joined, True
        if not joined:
            backend.join(KILL_WAIT if backend.live() else REAP_DEADLINE)
            if self._owns_ray:
                ray.shutdown()

    def __enter__(self) -> RaySupervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else f"{len(self._backend.live())} live tasks"
        return f"<procsup.ray.RaySupervisor {state}>"


RaySupervisor.__module__ = "procsup.ray"

_RUNNING: set[RaySupervisor] = set()
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_registered = False


def _register_atexit() -> None:
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_shutdown_all)


def _shutdown_all() -> None:
    for sup in list(_RUNNING):
        sup.shutdown()
