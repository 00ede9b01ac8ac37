"""The runtime seam: supervision (lifecycle, restarts, timeouts, status, the handle) works over any
backend that keeps the protocol of ``procsup._supervision.runtime``, and every stop goes down one
ladder (``procsup._os.tree.Ladder``). No process is started here: the backend is a fake whose runs
end when the test says so, and the ladder's clock is the test's."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil
import pytest

from procsup import CancellationToken, CriticalTaskExecutionHandle, TaskFailedError
from procsup._os import tree
from procsup._os.tree import Ladder
from procsup._supervision.lifecycle import Lifecycle
from procsup._supervision.options import TaskOptions, check_options
from procsup._supervision.runtime import Facts, Run, RunSpec
from procsup._supervision.status import StatusHub, TaskEvent
from procsup._supervision.timers import Timer


class FakeRun:
    """A run that ends when the test sets its future."""

    def __init__(self, spec: RunSpec, pid: int) -> None:
        self.spec = spec
        self.pid = pid
        self.node_id: str | None = None
        self.exitcode: int | None = None
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self.signalled = False

    def facts(self) -> Facts:
        return Facts(self.pid, 4096, 12.5)


class FakeBackend:
    """Keeps the runtime protocol with no process: starts are recorded, timers run when the test
    calls them, a stop is recorded and cancels the runs' tokens (the ladder's first step)."""

    grace_period = 0.5

    def __init__(self) -> None:
        self.closed = False
        self.runs: list[FakeRun] = []
        self.stops: list[tuple[list[Run], float | None, str, str, bool]] = []
        self.timers: list[tuple[float, Timer]] = []

    def start(self, spec: RunSpec) -> FakeRun:
        if self.closed:
            raise RuntimeError("this Supervisor has been shut down")
        run = FakeRun(spec, 1000 + len(self.runs))
        self.runs.append(run)
        return run

    def stop(
        self,
        runs: Sequence[Run],
        grace: float | None,
        cancel_reason: str,
        stop_reason: str,
        *,
        failure: bool = False,
    ) -> Ladder:
        self.stops.append((list(runs), grace, cancel_reason, stop_reason, failure))
        for run in runs:
            run.spec.token.cancel(cancel_reason)
        ladder = Ladder([], grace)
        ladder.step()
        return ladder

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(delay, callback)
        self.timers.append((delay, timer))
        return timer

    def fire(self) -> float:
        """Run the earliest timer still armed; return its delay."""
        delay, timer = next((d, t) for d, t in self.timers if t.callback is not None)
        callback, timer.callback = timer.callback, None
        assert callback is not None
        callback()
        return delay

    def live(self) -> list[Run]:
        return [run for run in self.runs if not run.future.done()]

    def on_outcome_thread(self) -> bool:
        return False  # its timers fire on the test's thread, which never waits on them

    def close(self) -> None:
        self.closed = True

    def join(self, timeout: float) -> bool:
        return True


class FakeRuntime:
    """What a handle runs under (``handle.Runtime``), over the fake backend."""

    def __init__(self, backend: FakeBackend, options: TaskOptions) -> None:
        self.backend = backend
        self.status = StatusHub()
        self.options = options

    def _launch(
        self,
        task_fn: Callable[..., Any],
        parent: CancellationToken,
        description: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any] | None,
    ) -> Lifecycle:
        life = Lifecycle(
            self.backend, self.status, task_fn, parent, description, args, kwargs, self.options
        )
        life.start()
        return life


def work(token: CancellationToken) -> None:
    """Never runs: the fake backend starts no process."""


def _failed(run: FakeRun) -> TaskFailedError:
    return TaskFailedError("Critical task 'w' failed: boom", description="w", pid=run.pid)


def test_a_transient_task_restarts_through_the_backend() -> None:
    """Test that the lifecycle starts each run through the protocol, with a fresh child token,
    restarts a failed transient task after its backoff, and publishes the final value; its
    failures leave the parent alone (the backend is told not to cancel it)."""
    backend, parent = FakeBackend(), CancellationToken()
    runtime = FakeRuntime(backend, check_options(restart="transient", backoff=(0.25, 0.25)))
    events: list[TaskEvent] = []
    runtime.status.add_callback(events.append)
    handle = CriticalTaskExecutionHandle(work, parent, "w", args=(1,), runtime=runtime)
    first = backend.runs[0]
    assert first.spec.args == (1,)
    assert not first.spec.cancels_parent
    first.future.set_exception(_failed(first))
    assert 0.125 <= backend.fire() <= 0.25  # the backoff, jittered
    second = backend.runs[1]
    assert second.spec.token != first.spec.token
    assert not second.spec.token.is_cancelled()
    assert handle.pid == second.pid
    assert handle.restarts == 1
    (snapshot,) = [life.snapshot() for life in runtime.status.live()]
    assert (snapshot.pid, snapshot.rss, snapshot.cpu_percent) == (second.pid, 4096, 12.5)
    second.future.set_result(7)
    assert handle.join(0) == 7
    assert [e.kind for e in events] == ["started", "failed", "restarted", "finished"]
    assert not parent.is_cancelled()
    assert runtime.status.live() == []


def test_a_timeout_stops_the_run_as_a_failure_through_the_backend() -> None:
    """Test that a run's timeout asks the backend to stop it as a failure (the ladder a stop
    uses, with the supervisor's grace period), not with a stop request."""
    backend, parent = FakeBackend(), CancellationToken()
    runtime = FakeRuntime(backend, check_options(timeout=5))
    handle = CriticalTaskExecutionHandle(work, parent, "w", runtime=runtime)
    (run,) = backend.runs
    assert run.spec.cancels_parent
    assert backend.fire() == 5.0
    ((runs, grace, cancel, reason, failure),) = backend.stops
    assert (runs, grace, failure) == ([run], backend.grace_period, True)
    assert cancel == "Critical task 'w' timed out after 5 s"
    assert reason.startswith("it exceeded its timeout of 5 s")
    assert run.spec.token.cause == cancel
    run.future.set_result(None)  # it returned once cancelled
    assert handle.join(0) is None


def test_stop_goes_down_the_backends_ladder_and_covers_a_run_started_meanwhile() -> None:
    """Test that handle.stop() hands the current run to the backend's ladder with its grace, and
    that a run a restart starts after the stop request is stopped the same way."""
    backend, parent = FakeBackend(), CancellationToken()
    runtime = FakeRuntime(backend, check_options(restart="permanent", backoff=(0.0, 0.0)))
    handle = CriticalTaskExecutionHandle(work, parent, "w", runtime=runtime)
    first = backend.runs[0]
    first.future.set_result(None)  # permanent: a restart is due
    start = backend.start

    def start_then_stop(spec: RunSpec) -> FakeRun:  # stop() comes while the restart starts
        run = start(spec)
        handle._life.stop("stop requested", "it did not honour cancellation within 2 s", 2.0)
        return run

    backend.start = start_then_stop  # type: ignore[method-assign]
    backend.fire()
    second = backend.runs[1]
    assert [(runs, grace) for runs, grace, *_ in backend.stops] == [([first], 2.0), ([second], 2.0)]
    assert second.spec.token.is_cancelled()
    second.future.set_result(None)
    assert handle.join(0) is None


class FakeRung:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.log: list[str] = []
        self.gone = False

    def cancel(self) -> None:
        self.log.append("cancel")

    def exited(self) -> bool:
        return self.gone

    def terminate(self) -> None:
        self.log.append("SIGTERM")

    def roots(self) -> list[psutil.Process]:
        self.log.append("roots")
        return [psutil.Process()]  # stands for the tree; kill_trees is replaced below

    def stuck(self) -> list[str]:
        return [f"pid {self.pid}: D (disk sleep)"]


@pytest.fixture
def killed(monkeypatch: pytest.MonkeyPatch) -> list[list[psutil.Process]]:
    calls: list[list[psutil.Process]] = []
    monkeypatch.setattr(tree, "kill_trees", calls.append)
    return calls


def test_the_ladder_cancels_waits_terminates_kills_then_reports(
    killed: list[list[psutil.Process]],
) -> None:
    """Test the ladder's order and its waits: cancel, grace, SIGTERM, KILL_AFTER, one kill_trees
    for every tree still alive, KILL_WAIT, then the survivors are reported."""
    first, second = FakeRung(1), FakeRung(2)
    ladder = Ladder([first, second], grace=2.0)
    assert ladder.step(now=100.0) == 102.0
    assert ladder.step(now=101.0) == 102.0  # nothing is due yet
    assert first.log == second.log == ["cancel"]
    assert ladder.step(now=102.0) == 102.0 + tree.KILL_AFTER
    assert first.log == second.log == ["cancel", "SIGTERM"]
    first.gone = True
    assert ladder.step(now=103.0) == 103.0 + tree.KILL_WAIT
    assert (first.log, second.log) == (["cancel", "SIGTERM"], ["cancel", "SIGTERM", "roots"])
    assert len(killed) == 1
    assert len(killed[0]) == 1
    assert not ladder.done.done()
    assert ladder.step(now=106.0) is None
    assert ladder.done.result(0) == ["pid 2: D (disk sleep)"]


def test_the_ladder_ends_as_soon_as_every_tree_has_exited(
    killed: list[list[psutil.Process]],
) -> None:
    """Test that a ladder whose trees have all exited finishes at its next step, whatever is
    due, and signals nothing."""
    rung = FakeRung(1)
    ladder = Ladder([rung], grace=0.0)
    rung.gone = True
    assert ladder.step(now=0.0) is None
    assert ladder.done.result(0) == []
    assert rung.log == ["cancel"]
    assert killed == []


def test_a_ladder_without_grace_only_cancels(killed: list[list[psutil.Process]]) -> None:
    """Test that grace=None asks the trees to stop and never escalates."""
    rung = FakeRung(1)
    ladder = Ladder([rung], grace=None)
    assert ladder.step(now=0.0) is None
    assert ladder.step(now=1e9) is None
    assert rung.log == ["cancel"]
    assert killed == []
    assert not ladder.done.done()
