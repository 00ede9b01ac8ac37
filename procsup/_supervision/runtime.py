"""The runtime seam: how supervision reaches "where processes run", and nothing else.

::

    supervision (this layer)                       a backend (local processes; procsup._ray)
    ────────────────────────                       ─────────────────────────────────────
    Lifecycle ── start(RunSpec) ─────────────────▶ a process runs task_fn(token, *args, **kwargs)
              ◀─ Run: pid, future, facts() ───────
    Lifecycle ── call_later(delay, fn) ──────────▶ fn runs on the backend's outcome thread
    handle.stop(), shutdown(), a run's timeout
              ── stop([runs], grace, ...) ───────▶ the one escalation ladder
                                                   (procsup._os.tree.Ladder): cancel ─ grace ─
                                                   SIGTERM ─ 1 s ─ freeze and SIGKILL ─ report
              ◀─ Ladder.done: what survived ──────
    Run.future ◀── the outcome, published once ─── the run's process has ended (or is lost)
    Supervisor ── close(), join(timeout) ────────▶ no start after close(); threads and fds go

The contract
------------
Who calls what, from which thread:

- ``start(spec)``: from any thread, the caller's for a first run and the outcome thread for a
  restart. It validates what only the backend can judge (whether ``task_fn`` can be sent where
  it runs) and raises ``TypeError`` naming the task before any process exists; it raises
  ``RuntimeError`` after ``close()``; ``ImportError`` if the backend's first start finds a preload
  module broken. It returns once the process exists and is watched. ``spec.token`` is the run's
  own token, made by the caller; the backend hands it to the task and never cancels it, except
  through ``stop()``.
- ``Run.future``: set exactly once, on the backend's outcome thread (or on the thread that
  gives up on a lost backend, or, for a run that ended before ``start`` returned, on the thread
  that started it), never cancelled:

  - a result: the task returned that value;
  - ``TaskFailedError``: it raised an ``Exception``; ``__cause__`` carries its frames;
  - ``TaskPanickedError``: it raised another ``BaseException``;
  - ``TaskCrashedError``: it died without reporting (``.signal``, ``.exitcode``, the crash
    record), or ``stopped=True`` if a ladder signalled it on request (not a failure);
  - ``CriticalTaskError``: the backend was lost before the outcome was known.

  When ``spec.cancels_parent`` is True, a failure or a crash that was not a stop has cancelled
  ``spec.parent`` before the future is set (a failure as soon as its frame arrives). A restart
  policy that decides for itself passes False.
- ``Run.facts()``: any thread; pid, resident memory and CPU use now (None where unknown, e.g. the
  process just exited). ``Run.pid`` is known once ``start`` returns; ``Run.exitcode`` once it
  has been reaped. ``Run.node_id`` says which machine the pid is on: None for this one, a Ray
  node id (hex) for a run on a Ray cluster.
- ``stop(runs, grace, cancel_reason, stop_reason, failure=...)``: any thread, never blocks for
  longer than the ladder's first step (the cancel). The rest happens on the outcome thread. A
  run signalled with ``failure=False`` ends as a stop (``TaskCrashedError(stopped=True)``, its
  parent untouched); with ``failure=True`` (a timeout) ``stop_reason`` is why it crashed, and the
  crash is a failure. The returned ladder's ``done`` holds the descriptions of runs that
  outlived SIGKILL (D state); their outcome is still published whenever they die.
- ``call_later(delay, fn)``: any thread; ``fn`` runs on the outcome thread, which must never wait
  on another process. Restarts after a backoff and per-run timeouts use it.
- ``live()``: any thread; the runs whose outcome is not published yet.
- ``on_outcome_thread()``: any thread; True on a thread the backend needs in order to publish
  outcomes (its outcome thread, the thread its ``call_later`` callbacks run on). Code running
  there (an ``on_event`` callback) must not wait for an outcome or a ladder: only that thread
  could complete them.
- ``close()``: no start after it; ``join(timeout)`` once ``live()`` is empty: True once the
  backend's threads have ended and its fds are closed.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from procsup._os.tree import Ladder
from procsup._supervision.options import TaskOptions
from procsup._supervision.timers import Timer
from procsup._token.token import CancellationToken

__all__ = ["Backend", "Facts", "Run", "RunSpec"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a task, as supervision asks a backend to start it.

    Attributes:
        task_fn, args, kwargs: The call: ``task_fn(token, *args, **kwargs)`` in the process.
        description: Names the task in errors, logs and causes.
        parent: The token a failure cancels (when ``cancels_parent``).
        token: This run's own token, a child of ``parent`` made by the caller.
        options: Limits and output handling (the backend applies ``memory_limit``,
            ``cpu_time_limit`` and ``capture_output``, and logs the end of a ``quiet`` run at
            DEBUG only; supervision handles the rest).
        cancels_parent: False when a restart policy decides what a failure does.
    """

    task_fn: Callable[..., Any]
    description: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    parent: CancellationToken
    token: CancellationToken
    options: TaskOptions
    cancels_parent: bool


@dataclass(frozen=True)
class Facts:
    """A run's process now: its pid, resident memory (bytes) and CPU use (% of one core since the
    previous call, or since it started on the first). None where unknown."""

    pid: int | None
    rss: int | None
    cpu_percent: float | None


class Run(Protocol):
    """One run: one process somewhere. See the module docstring for the contract."""

    @property
    def spec(self) -> RunSpec: ...

    @property
    def pid(self) -> int: ...

    @property
    def exitcode(self) -> int | None: ...

    @property
    def node_id(self) -> str | None:
        """The Ray node (hex id) the process is on; None for a process on this machine."""
        ...

    @property
    def future(self) -> concurrent.futures.Future[Any]: ...

    @property
    def signalled(self) -> bool:
        """True once a ladder has signalled it (it is being stopped, or killed for a timeout)."""
        ...

    def facts(self) -> Facts: ...


class Backend(Protocol):
    """Where runs happen. See the module docstring for the contract."""

    @property
    def grace_period(self) -> float: ...

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called or the backend was lost: no run will start."""
        ...

    def start(self, spec: RunSpec) -> Run: ...

    def stop(
        self,
        runs: Sequence[Run],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        *,
        failure: bool = False,
    ) -> Ladder: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...

    def live(self) -> list[Run]: ...

    def on_outcome_thread(self) -> bool: ...

    def close(self) -> None: ...

    def join(self, timeout: float) -> bool: ...
