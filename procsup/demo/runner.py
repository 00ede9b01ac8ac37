"""One run of a demo scenario: start the tasks, follow their lifecycle, tell the story in order.

::

    Runner.run() ─ on the event loop thread of the demo process
      ├─ Supervisor(token=root).spawn(spec) ────▶ task processes (procsup.demo.tasks)
      ├─ sup.events() ── follow() / drain() ────▶ "failed"/"crashed" per run, "restarted",
      │                                           "escalated"
      ├─ per task: await handle.join_async() ───▶ drain(), then "finished" (its value) or an
      │                                           outcome the stream did not carry ("stopped")
      ├─ await root.cancelled() ────────────────▶ "cancelled" (cause), "stopping" per live task
      ├─ every 0.25 s: sup.tasks() + Sampler ───▶ live table / status lines / status objects
      ├─ Cues: every part played (a restart ────▶ cue.told.cancel(): the cued task's last act
      │   told, a "played" token, an outcome)       may come (procsup.demo.tasks)
      └─ SIGINT (loop signal handler) ──────────▶ root.cancel("SIGINT ...") ; twice: shutdown(0)

The order of events is part of the contract the tests check: a run's failure is told before the
restart or escalation it led to, a task's failure before the cancellation it caused, which is told
before the siblings' ``stopping`` and ``finished``; and the act that ends a story (a cued task's
crash) comes after every other task has played its part and been shown, on any machine.

Things that don't work
----------------------
- Reporting the cancellation from ``await root.cancelled()`` alone: the supervisor cancels the
  parent *before* publishing the outcome (and an escalation before emitting "escalated"), so the
  waiter often wakes first. It waits for the culprit's final outcome, which drains the event
  stream first: every event emitted before an outcome is published is queued by then.
- Final outcomes from the event stream alone: events carry errors, not return values, and a task's
  cleanup message is its return value. ``join_async`` gives the value; the stream gives every run.
- Schedules alone for the story's order ("the cache hits its limit at ~3 s, the parser crashes at
  5 s"): on a busy machine a schedule runs late and the acts swap. The cue makes the last act wait
  for the others; the schedules still set the pace, so an idle machine shows the same timeline.
- A SIGTERM handler in the demo under the fork start method: asyncio's wakeup fd is inherited by
  forked tasks, so a task being sent SIGTERM by ``stop()`` would wake the demo's handler. Only
  SIGINT is handled (tasks ignore it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any

from procsup import CancellationToken, CriticalTaskError, CriticalTaskExecutionHandle, Supervisor
from procsup.demo import tasks
from procsup.demo.rows import Row, Sampler, mib
from procsup.demo.runs import RunLog, classify, record, short
from procsup.demo.spec import Plan, Spec
from procsup.demo.stress import run_stress
from procsup.demo.view import View

__all__ = ["STRESS_TASKS", "STRESS_TASKS_SPAWN", "Cues", "Runner"]

GRACEFUL_AFTER = 3.0  # seconds before the demo itself cancels the root in "graceful"
GRACE = 5.0  # seconds tasks get to clean up after the root is cancelled
SAMPLE_EVERY = 0.25  # seconds between samples
REAP = 10.0  # seconds to wait for outcomes after escalating
STRESS_TASKS = 300
STRESS_TASKS_SPAWN = 60  # ~80 ms of CPU per start under spawn: 300 would take half a minute


def _takes(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


class Cues:
    """The story's handshakes (``procsup.demo.tasks``): who waits for the cue, who says when its
    part is played, and when the cue is given. Everything here runs on the event loop thread.

    Invariants: ``pending`` holds the tasks whose part is not played yet (none of them cued): one
    given a ``played`` token until that is cancelled, else a restartable one until its first
    restart is told; one whose final outcome is told is done. ``told`` is cancelled once
    ``pending`` is empty and there is a cued task, never before.
    """

    def __init__(self, root: CancellationToken, start_method: str, plan: list[Spec]) -> None:
        self.told = root.child_token()  # a child of the root: Ctrl-C reaches the waiters too
        self.kwargs: dict[str, dict[str, Any]] = {}  # by task: the cue or played token it gets
        self.played: dict[str, CancellationToken] = {}
        self.pending: set[str] = set()
        self.cued = any(_takes(spec.fn, "cue") for spec in plan)
        if not self.cued:
            return  # nothing waits: no handshakes at all
        context = multiprocessing.get_context(start_method)
        for spec in plan:
            name = spec.description
            if _takes(spec.fn, "cue"):
                free = (
                    int(spec.options.get("max_restarts", 0)) if spec.restart != "temporary" else 0
                )
                self.kwargs[name] = {"cue": tasks.Cue(self.told, context.RawValue("i", 0), free)}
            elif _takes(spec.fn, "played"):
                self.played[name] = root.child_token()
                self.kwargs[name] = {"played": self.played[name]}
                self.pending.add(name)
            elif spec.restart != "temporary":
                self.pending.add(name)


class Runner:
    """One run of one scenario. Everything here runs on the event loop thread.

    Invariants: ``rows``, ``specs`` and ``handles`` hold every started task, by description (unique
    in a scenario); ``failure`` is the first final failure (what the exit code reports), None while
    nothing failed for good.
    """

    def __init__(self, view: View, args: argparse.Namespace, plan: Plan) -> None:
        self.view = view
        self.args = args
        self.plan = plan
        self.root = CancellationToken()
        self.sup = Supervisor(start_method=args.start_method, token=self.root, grace_period=GRACE)
        self.rows: dict[str, Row] = {}
        self.specs: dict[str, Spec] = {}
        self.handles: dict[str, CriticalTaskExecutionHandle[Any]] = {}
        self.outcomes: dict[str, asyncio.Task[None]] = {}
        self.log = RunLog(view, self.rows, self.specs, self.handles, self._restarted)
        self.cues: Cues | None = None
        self.sampler = Sampler(tasks.PROCESS_PREFIX)
        self.failure: CriticalTaskError | None = None
        self.cancel_seen: float | None = None  # view time at which the root's cancel was seen
        self.cancel_told = asyncio.Event()
        self.interrupts = 0
        self.seen_subtasks: set[int] = set()

    async def run(self) -> int:
        """Run the scenario to its end; return the exit code."""
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
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        try:
            if scenario == "stress":
                spawn = self.sup.start_method == "spawn"
                count = self.args.tasks or (STRESS_TASKS_SPAWN if spawn else STRESS_TASKS)
                code = await self._stress(count, self.args.concurrency)
            else:
                delay = GRACEFUL_AFTER if scenario == "graceful" else None
                code = await self._workers(self.plan(scenario, self.sup.start_method), delay)
        finally:
            # Reaps anything still alive; blocking, so off the loop (Ctrl-C still works).
            await asyncio.to_thread(self.sup.shutdown, 0)
            loop.remove_signal_handler(signal.SIGINT)
            if self.log.stream is not None:
                self.log.stream.close()
        return code

    # ---------------------------------------------------------------- the worker scenarios

    async def _workers(self, plan: list[Spec], stop_after: float | None) -> int:
        self.log.stream = self.sup.events()  # before the first spawn: no run goes untold
        follower = asyncio.create_task(self.log.follow())
        self.cues = Cues(self.root, self.sup.start_method, plan)
        for spec in plan:
            self._spawn(spec)
        sampler = asyncio.create_task(self._sample_forever())
        played = [
            asyncio.create_task(self._watch_played(name, token))
            for name, token in self.cues.played.items()
        ]
        self._part_played(None)  # with nothing pending, the cue is given at once
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
                names = ", ".join(name for name, row in self.rows.items() if row.ended is None)
                self.view.event("escalate", f"still running after {GRACE} s: stopping {names}")
                await asyncio.to_thread(self.sup.shutdown, 0)
                await asyncio.wait(self.outcomes.values(), timeout=REAP)
        finally:
            for helper in (root_cancelled, sampler, follower, *played):
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
        self.view.summary(list(self.rows.values()))
        return self._exit()

    def _spawn(self, spec: Spec) -> None:
        name = spec.description
        handshakes = self.cues.kwargs.get(name) if self.cues is not None else None
        handle = self.sup.spawn(spec.fn, name, args=spec.args, kwargs=handshakes, **spec.options)
        self.specs[name], self.handles[name] = spec, handle
        row = self.rows[name] = Row(name, handle.pid, self.view.now())
        self.outcomes[name] = asyncio.create_task(self._watch(handle, row))
        policy = "" if spec.restart == "temporary" else f"; {spec.policy()}"
        if "memory_limit" in spec.options:
            policy += f"; memory_limit={mib(spec.options['memory_limit'])}"
        self.view.event(
            "started",
            f"{name} (pid {handle.pid}){policy}",
            task=name,
            pid=handle.pid,
            restart=spec.restart,
        )

    # ---------------------------------------------------------------- final outcomes

    async def _watch(self, handle: CriticalTaskExecutionHandle[Any], row: Row) -> None:
        error: CriticalTaskError | None = None
        try:
            value = await handle.join_async()
        except CriticalTaskError as exc:
            error, value = exc, None
        self.log.drain()
        self._part_played(row.description)
        ended = self.view.now()
        sibling = self.root.is_cancelled() and not self._caused(row.description)
        if sibling:
            # A sibling that cleans up fast must not be told before the cancellation it obeyed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cancel_told.wait(), REAP)
        row.ended, row.exitcode, row.subtasks = ended, handle.exitcode, []
        fields: dict[str, Any] = {"task": row.description, "pid": row.pid, "exitcode": row.exitcode}
        took = ""
        if sibling and self.cancel_seen is not None:
            fields["after_cancel"] = round(max(0.0, ended - self.cancel_seen), 3)
            took = f" in {fields['after_cancel']:.2f} s"
        if error is None:
            row.state, row.detail = "done", str(value)
            text = f"{row.description} (pid {row.pid}) cleaned up{took}: {value}"
            self.view.event("finished", text, **fields, restarts=row.restarts, result=value)
            self.view.refresh(list(self.rows.values()))
            return
        kind = classify(error)
        row.state = "escalated" if row.description in self.log.escalated else kind
        row.detail = short(error)
        if kind != "stopped" and self.failure is None:
            self.failure = error
        if not self.log.told(error):  # a stop, or a lost supervisor: not a run's failure
            details = record(error, row, self.view.now())
            signame = getattr(error, "signal", None)
            self.view.event(kind, str(error), **fields, signal=signame, record=details)
        self.view.refresh(list(self.rows.values()))

    def _caused(self, name: str) -> bool:
        return (self.root.cause or "").startswith(f"Critical task '{name}' ")

    async def _on_root_cancelled(self) -> None:
        self.cancel_seen = self.view.now()
        culprit = next((t for name, t in self.outcomes.items() if self._caused(name)), None)
        if culprit is not None:  # tell the failure first, then the cancellation it caused
            await asyncio.wait([culprit], timeout=REAP)
        cause = self.root.cause
        self.view.event("cancelled", f"root token cancelled; cause: {cause}", cause=cause)
        self.cancel_told.set()
        for row in self.rows.values():
            if row.ended is None:
                row.state = "cancelling"
                text = f"{row.description} (pid {row.pid}) sees its token cancelled, cleans up"
                self.view.event("stopping", text, task=row.description, pid=row.pid)
        self.view.refresh(list(self.rows.values()))

    # ---------------------------------------------------------------- the story's cue

    def _restarted(self, name: str) -> None:
        if self.cues is not None and name not in self.cues.played:
            self._part_played(name)

    async def _watch_played(self, name: str, token: CancellationToken) -> None:
        await token.cancelled()
        self._part_played(name)

    def _part_played(self, name: str | None) -> None:
        """``name``'s part is played (None: nobody's, just look): give the cue once all are."""
        cues = self.cues
        if cues is None:
            return
        if name is not None:
            cues.pending.discard(name)
        if not cues.cued or cues.pending or cues.told.is_cancelled():
            return
        self._sample()  # show what the parts left on screen (a sub-task) before the last act
        cues.told.cancel("the story's earlier acts are told")

    # ---------------------------------------------------------------- the view

    async def _sample_forever(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(SAMPLE_EVERY)  # the view's refresh period, not a synchronisation

    def _sample(self) -> None:
        rows = list(self.rows.values())
        self.sampler.sample(rows, self.sup.tasks())
        for row in rows:
            for pid, proc_name, _ in row.subtasks:
                if pid not in self.seen_subtasks:
                    self.seen_subtasks.add(pid)
                    self.view.event(
                        "subtask",
                        f"{row.description} runs a nested critical task: {proc_name} (pid {pid})",
                        task=row.description,
                        pid=pid,
                        name=proc_name,
                    )
        self.view.status(rows)

    def _exit(self) -> int:
        rows = self.rows.values()
        stopped = [row.description for row in rows if row.state in ("stopped", "lost")]
        others = "every other task" if self.failure is not None else "every task"
        tail = (
            f"; {', '.join(stopped)} had to be stopped"
            if stopped
            else f"; {others} shut down gracefully"
        )
        if self.failure is not None:
            culprit = self.failure.description or ""
            why = self.log.escalated.get(culprit, str(self.failure)).split("; last failures:")[0]
            code, reason = 1, f"{why}{tail}"
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

    # ---------------------------------------------------------------- stress

    async def _stress(self, count: int, concurrency: int) -> int:
        ok = await run_stress(self.view, self.sup, count, concurrency)
        code = 0 if ok else (130 if self.interrupts else 1)
        reason = "every task returned its value" if ok else "not every task returned its value"
        if self.interrupts:
            reason += " (interrupted by Ctrl-C)"
        self.view.event("exit", f"exit {code}: {reason}", code=code, reason=reason)
        return code
