"""``python -m procsup``: the demo a newcomer runs first (``make demo``).

::

    main(argv) ─ asyncio.run(_Demo.run())      one event loop thread in the demo process
      ├─ Supervisor(token=root) ── spawn() ──▶ task processes (procsup._demo_tasks)
      ├─ per task: await handle.join_async() ─▶ "finished" | "crashed" | "failed" | "stopped"
      ├─ await root.cancelled() ──────────────▶ "cancelled" (cause), "stopping" per live task
      ├─ every 0.25 s: psutil samples ────────▶ live table / status lines / status objects
      └─ SIGINT (loop signal handler) ────────▶ root.cancel("SIGINT ...") ; twice: shutdown(0)

Events reach a view (``procsup._demo_view``): a rich live table on a terminal, timestamped lines
otherwise, one JSON object per line with ``--json``. The order of events is part of the contract
the tests check: a failure is reported before the cancellation it caused, which is reported before
the siblings' ``stopping`` and ``finished``.

Things that don't work
----------------------
- Reporting the cancellation from ``await root.cancelled()`` alone: the supervisor cancels the
  parent *before* publishing the outcome, so the waiter often wakes first and the story would
  read "cancelled" before "crashed". The waiter waits for the culprit's outcome first.
- A SIGTERM handler in the demo under the fork start method: asyncio's wakeup fd is inherited by
  forked tasks, so a task being sent SIGTERM by ``stop()`` would wake the demo's handler. Only
  SIGINT is handled (tasks ignore it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from procsup import _demo_tasks as tasks
from procsup._demo_stress import run_stress
from procsup._demo_view import Row, Sampler, View, make_view, mib
from procsup._errors import (
    CriticalTaskError,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._handle import CriticalTaskExecutionHandle
from procsup._supervisor import Supervisor
from procsup._token import CancellationToken

__all__ = ["SCENARIOS", "main"]

CRASH_AFTER = 5.0  # seconds before the native parser segfaults
FAIL_AFTER = 2.0  # seconds before the config loader raises
GRACEFUL_AFTER = 3.0  # seconds before the demo itself cancels the root in "graceful"
GRACE = 5.0  # seconds tasks get to clean up after the root is cancelled
SAMPLE_EVERY = 0.25  # seconds between psutil samples
REAP = 10.0  # seconds to wait for outcomes after escalating

STRESS_TASKS = 300
STRESS_TASKS_SPAWN = 60  # ~80 ms of CPU per start under spawn: 300 would take half a minute

SCENARIOS = {  # one line each in --help
    "crash": "(default) a worker segfaults in C after 5 s: root cancelled, all clean up, exit 1",
    "error": "a worker raises ValueError after 2 s: its child traceback, clean shutdown, exit 1",
    "graceful": "nothing fails; after 3 s the demo cancels the root, all clean up, exit 0",
    "restart": "restart policies (Erlang-style), once procsup has them; until then says so, exit 2",
    "stress": f"{STRESS_TASKS} tiny tasks through one supervisor: tasks/s, latency p50/p99, exit 0",
}

Plan = list[tuple[Callable[..., Any], str, tuple[Any, ...]]]


def _plan(scenario: str, start_method: str) -> Plan:
    workers: Plan = [
        (tasks.cpu_worker, "cpu worker", ()),
        (tasks.io_worker, "io worker", ()),
        (tasks.coordinator, "coordinator", (start_method,)),
        (tasks.async_heartbeat, "async heartbeat", ()),
    ]
    if scenario == "crash":
        workers.append((tasks.native_parser, "native parser", (CRASH_AFTER,)))
    elif scenario == "error":
        workers.append((tasks.config_loader, "config loader", (FAIL_AFTER,)))
    return workers


def _extras(exc: BaseException) -> dict[str, str]:
    """Attributes beyond the base ones (e.g. a richer crash record), shown as they are added."""
    known = {"description", "pid", "exitcode", "signal", "stopped", "remote_traceback"}
    return {k: str(v) for k, v in vars(exc).items() if k not in known and not k.startswith("_")}


class _Demo:
    """One run of one scenario. Everything here runs on the event loop thread."""

    def __init__(self, view: View, args: argparse.Namespace) -> None:
        self.view = view
        self.args = args
        self.root = CancellationToken()
        self.sup = Supervisor(start_method=args.start_method, token=self.root, grace_period=GRACE)
        self.rows: list[Row] = []
        self.outcomes: dict[str, asyncio.Task[None]] = {}
        self.failure: CriticalTaskError | None = None  # the first failed/crashed/panicked task
        self.cancel_seen: float | None = None  # view time at which the root's cancel was seen
        self.reported = asyncio.Event()  # set once "cancelled" has been reported
        self.interrupts = 0
        self.seen_subtasks: set[int] = set()

    async def run(self) -> int:
        scenario = self.args.scenario
        self.view.event(
            "begin",
            f"scenario {scenario!r} under one Supervisor (start method {self.sup.start_method}, "
            f"demo pid {os.getpid()}); every task's token is a child of the root token; "
            "Ctrl-C cancels the root",
            scenario=scenario,
            start_method=self.sup.start_method,
            pid=os.getpid(),
        )
        if scenario == "restart":
            return self._restart_unavailable()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        try:
            if scenario == "stress":
                spawn = self.sup.start_method == "spawn"
                count = self.args.tasks or (STRESS_TASKS_SPAWN if spawn else STRESS_TASKS)
                code = await self._stress(count, self.args.concurrency)
            else:
                delay = GRACEFUL_AFTER if scenario == "graceful" else None
                code = await self._workers(_plan(scenario, self.sup.start_method), delay)
        finally:
            # Reaps anything still alive; blocking, so off the loop (Ctrl-C still works).
            await asyncio.to_thread(self.sup.shutdown, 0)
            loop.remove_signal_handler(signal.SIGINT)
        return code

    # ---------------------------------------------------------------- the worker scenarios

    async def _workers(self, plan: Plan, stop_after: float | None) -> int:
        for fn, description, args in plan:
            self._spawn(fn, description, args)
        sampler = asyncio.create_task(self._sample_forever())
        root_cancelled = asyncio.create_task(self.root.cancelled())
        everyone: asyncio.Future[Any] = asyncio.gather(*self.outcomes.values())
        try:
            done, _ = await asyncio.wait(
                {root_cancelled, everyone}, timeout=stop_after, return_when="FIRST_COMPLETED"
            )
            if not done:
                self.root.cancel("the demo's time is up: asking every task to stop")
                await root_cancelled
            if self.root.is_cancelled():
                await self._on_root_cancelled()
            _, pending = await asyncio.wait(self.outcomes.values(), timeout=GRACE)
            if pending:
                names = ", ".join(row.description for row in self.rows if row.ended is None)
                self.view.event("escalate", f"still running after {GRACE} s: stopping {names}")
                await asyncio.to_thread(self.sup.shutdown, 0)
                await asyncio.wait(self.outcomes.values(), timeout=REAP)
        finally:
            root_cancelled.cancel()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        self.view.summary(self.rows)
        return self._exit()

    def _spawn(self, fn: Callable[..., Any], description: str, args: tuple[Any, ...]) -> None:
        handle = self.sup.spawn(fn, description, args=args)
        row = Row(description, handle.pid, self.view.now())
        self.rows.append(row)
        self.outcomes[description] = asyncio.create_task(self._watch(handle, row))
        self.view.event(
            "started", f"{description} (pid {handle.pid})", task=description, pid=handle.pid
        )

    async def _watch(self, handle: CriticalTaskExecutionHandle[Any], row: Row) -> None:
        error: CriticalTaskError | None = None
        try:
            value = await handle.join_async()
        except CriticalTaskError as exc:
            error, value = exc, None
        ended = self.view.now()
        sibling = self.root.is_cancelled() and not self._caused(row.description)
        if sibling:
            # A sibling that cleans up fast must not be told before the cancellation it obeyed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reported.wait(), REAP)
        row.ended, row.exitcode, row.subtasks = ended, handle.exitcode, []
        fields: dict[str, Any] = {"task": row.description, "pid": row.pid, "exitcode": row.exitcode}
        took = ""
        if sibling and self.cancel_seen is not None:
            fields["after_cancel"] = round(max(0.0, ended - self.cancel_seen), 3)
            took = f" in {fields['after_cancel']:.2f} s"
        if error is None:
            row.state, row.detail = "done", str(value)
            text = f"{row.description} (pid {row.pid}) cleaned up{took}: {value}"
            self.view.event("finished", text, **fields, result=value)
            self.view.refresh(self.rows)
            return
        row.state = kind = self._classify(error)
        row.detail = str(error).split(": ", 1)[-1]
        if kind != "stopped" and self.failure is None:
            self.failure = error
        record = self._record(error, row)
        signame = getattr(error, "signal", None)
        self.view.event(kind, str(error), **fields, signal=signame, record=record)
        self.view.refresh(self.rows)

    def _caused(self, name: str) -> bool:
        return (self.root.cause or "").startswith(f"Critical task '{name}' ")

    @staticmethod
    def _classify(exc: CriticalTaskError) -> str:
        if isinstance(exc, TaskCrashedError):
            return "stopped" if exc.stopped else "crashed"
        if isinstance(exc, TaskFailedError):
            return "failed"
        if isinstance(exc, TaskPanickedError):
            return "panicked"
        return "lost"

    def _record(self, exc: CriticalTaskError, row: Row) -> dict[str, Any]:
        record: dict[str, Any] = {
            "task": row.description,
            "pid": row.pid,
            "exit code": row.exitcode,
        }
        if isinstance(exc, TaskCrashedError):
            record["signal"] = exc.signal or "none (exited)"
        record["wall time"] = f"{row.uptime(self.view.now()):.2f} s"
        record["cpu time"] = f"{row.cpu_time:.2f} s (last sample)"
        record["peak RSS"] = f"{mib(row.peak_rss)} (VmHWM, last sample)"
        record.update(_extras(exc))
        traceback = getattr(exc, "remote_traceback", None)
        if traceback:
            record["child traceback"] = traceback
        return record

    async def _on_root_cancelled(self) -> None:
        self.cancel_seen = self.view.now()
        culprit = next((t for name, t in self.outcomes.items() if self._caused(name)), None)
        if culprit is not None:  # tell the failure first, then the cancellation it caused
            await asyncio.wait([culprit], timeout=REAP)
        cause = self.root.cause
        self.view.event("cancelled", f"root token cancelled; cause: {cause}", cause=cause)
        self.reported.set()
        for row in self.rows:
            if row.ended is None:
                row.state = "cancelling"
                text = f"{row.description} (pid {row.pid}) sees its token cancelled, cleans up"
                self.view.event("stopping", text, task=row.description, pid=row.pid)
        self.view.refresh(self.rows)

    async def _sample_forever(self) -> None:
        sampler = Sampler(tasks.PROCESS_PREFIX)
        while True:
            sampler.sample(self.rows)
            for row in self.rows:
                for pid, proc_name, _ in row.subtasks:
                    if pid not in self.seen_subtasks:
                        self.seen_subtasks.add(pid)
                        self.view.event(
                            "subtask",
                            f"{row.description} runs a nested critical "
                            f"task: {proc_name} (pid {pid})",
                            task=row.description,
                            pid=pid,
                            name=proc_name,
                        )
            self.view.status(self.rows)
            await asyncio.sleep(SAMPLE_EVERY)  # the view's refresh period, not a synchronisation

    def _exit(self) -> int:
        stopped = [row.description for row in self.rows if row.state in ("stopped", "lost")]
        others = "every other task" if self.failure is not None else "every task"
        tail = (
            f"; {', '.join(stopped)} had to be stopped"
            if stopped
            else f"; {others} shut down gracefully"
        )
        if self.failure is not None:
            code, reason = 1, f"{self.failure}{tail}"
        elif self.interrupts:
            code, reason = 130, f"interrupted (Ctrl-C){tail}"
        elif stopped:
            code, reason = 1, f"shut down{tail}"
        else:
            code, reason = 0, f"nothing failed{tail}"
        self.view.event("exit", f"exit {code}: {reason}", code=code, reason=reason)
        return code

    def _on_sigint(self) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.view.event(
                "interrupt",
                f"Ctrl-C: cancelling the root token; tasks get {GRACE} s "
                "to clean up (Ctrl-C again stops them now)",
                signal="SIGINT",
            )
            self.root.cancel("SIGINT (Ctrl-C): the demo was interrupted")
        else:
            self.view.event("interrupt", "Ctrl-C again: stopping every task now", signal="SIGINT")
            asyncio.get_running_loop().run_in_executor(None, self.sup.shutdown, 0)

    # ---------------------------------------------------------------- other scenarios

    async def _stress(self, count: int, concurrency: int) -> int:
        ok = await run_stress(self.view, self.sup, count, concurrency)
        code = 0 if ok else (130 if self.interrupts else 1)
        reason = "every task returned its value" if ok else "not every task returned its value"
        if self.interrupts:
            reason += " (interrupted by Ctrl-C)"
        self.view.event("exit", f"exit {code}: {reason}", code=code, reason=reason)
        return code

    def _restart_unavailable(self) -> int:
        params = inspect.signature(Supervisor.spawn).parameters
        if "restart" in params:
            why = "restart policies exist in this build, but this demo does not show them yet"
        else:
            why = (
                "this scenario needs restart policies (Supervisor.spawn(restart='transient', "
                "max_restarts=3, period=5.0)), which this build of procsup does not have yet"
            )
        self.view.event("unavailable", why, scenario="restart")
        self.view.event("exit", f"exit 2: {why}", code=2, reason=why)
        return 2


def _parser() -> argparse.ArgumentParser:
    scenarios = "\n".join(f"  {name:<9} {text}" for name, text in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python -m procsup",
        description="procsup demo: critical tasks in child processes, supervised. A task that "
        "fails or crashes cancels its parent token, and everything shuts down cleanly. The "
        "workers: a CPU worker, an I/O worker, a coordinator running its own sub-task (a nested "
        "critical task), an async def heartbeat, and the scenario's own.",
        epilog=f"scenarios:\n{scenarios}\n\nCtrl-C cancels the root token: every task cleans "
        "up and the demo exits 130 (a second Ctrl-C stops them at once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario", choices=list(SCENARIOS), default="crash", help="what to run (default: crash)"
    )
    parser.add_argument(
        "--start-method",
        choices=multiprocessing.get_all_start_methods(),
        default=None,
        help="multiprocessing start method for the tasks "
        "(default: procsup's, forkserver where available)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per line (the events, in order)"
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        metavar="N",
        help=f"stress: how many tasks (default: {STRESS_TASKS}, or {STRESS_TASKS_SPAWN} under "
        "spawn, where each start costs a fresh interpreter)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        metavar="N",
        help="stress: tasks in flight at once (default: 8)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code.

    Args:
        argv: Command-line arguments without the program name; None means ``sys.argv[1:]``.

    Returns:
        0 when every task shut down gracefully, 1 when a task failed or crashed (or had to be
        stopped), 2 when the scenario cannot run in this build, 130 after Ctrl-C.
    """
    args = _parser().parse_args(argv)
    if (args.tasks is not None and args.tasks < 1) or args.concurrency < 1:
        _parser().error("--tasks and --concurrency must be at least 1")
    # The demo reports every outcome itself; without a handler, logging's last resort would
    # print the supervisor's ERROR records to stderr in the middle of the live view.
    logging.getLogger("procsup").addHandler(logging.NullHandler())
    view = make_view(args.json)
    try:
        return asyncio.run(_Demo(view, args).run())
    finally:
        view.close()
