"""Which task modules the zygote imports itself: those a throwaway child imported cleanly and fast.

A task's own module is user code whose top level may crash natively, ``os._exit``, or block for
seconds. The zygote is one single-threaded process that guards every task of its supervisor: it
never runs such code on the strength of a start alone. A module new to it is imported by the task
itself (``server._become_task``), and a *trial*, a child forked for that alone, finds out whether
the zygote may import it too, so that later tasks are forked with it ready::

    zygote (``server._Server``)                      trial (forked like a spare, never a task)
    ───────────────────────────                      ─────────────────────────────────────────
    Spawn(module=m), m new here: the task imports
      m itself; m is queued (``Trials.consider``)
    no request waits, the spare is forked, and no
      trial runs: fork one for the first queued m ─▶ die with the zygote, close its fds, stdout
      (``Guardian.trials``: not a task, not an       and stderr to /dev/null; import m, timed by
      orphan; reaped silently, its orphans killed)   its own clock: _exit 0 if that took at most
                                                     BOUND s, SLOW if longer, FAILED if it raised
    reaped ◀──────────────────────────────────────── exit status (a crash: its signal)
      0, and no Sync since its fork: m is safe ─▶ imported here once no request waits; the
                                                  spare (forked without m) is replaced
      SLOW, FAILED, a crash, any other end: m is never imported here; its tasks import it
    still running DEADLINE s after its fork: SIGKILLed, and m is never imported here
    a Sync (path, argv, cwd or environment changed): m's running trial proves nothing, and a
      passed m not imported yet is tried again: m's top level may read any of them
    EOF from the supervisor: the trial is SIGKILLed with the spare

The modules of ``Supervisor(preload=...)`` (``messages.Preload``) and procsup's own needs
(``asyncio`` for an async task, ``cloudpickle`` for a payload by value) are imported by the zygote
at once, as before: the user asked for the first, and the others are known.

Things that don't work
----------------------
- Importing each task's module in the zygote on its first start (as procsup did): a module whose
  top level segfaults or calls ``os._exit`` killed the zygote, and with it (PR_SET_PDEATHSIG) every
  running task of the supervisor, each reported as "killed by SIGKILL: out of memory or killed
  externally" with its parent cancelled; ``spawn()`` itself raised "procsup zygote exited
  unexpectedly", and did again at every later start of that task. A top level that slept 6 s made
  the zygote notice another task's SIGKILL 5.2 s late and held an unrelated ``spawn()`` 5.5 s;
  ``import ray`` (~0.2 s) held both as long.
- Importing it in the zygote in a thread (not tried: ruled out): the zygote forks tasks and spares
  at any moment, and a fork while another thread holds the import lock (or any lock the module's
  top level takes) leaves the child that lock held forever. The zygote stays single-threaded.
- Trusting a trial whose environment has changed since: the module's top level may read the
  environment, ``sys.path`` or the working directory (a reproducer crashes on import only when an
  environment variable is set), so a ``Sync`` voids a trial in flight and requeues a passed module.
- Trying a slow module again (a busy machine can slow a quick import once), three trials in all:
  a module whose top level waits on something outside (a FIFO, ``tests/zygote_import_gate.py``)
  passed a trial that met the FIFO's writer closing it within BOUND, and the zygote, importing
  it next, blocked forever opening the FIFO again (seen while writing those tests). One slow
  trial is the verdict. No trial proves that the zygote's own import will go as the trial's did:
  it keeps out the modules that crash, raise or stall wherever they are imported.
- Timing the trial from the zygote, fork to reap (not tried: ruled out): that counts the fork,
  the child's first page faults and the scheduler of a busy machine, not the import. The trial
  times its own import; the zygote's ``DEADLINE`` is only for one that never ends.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import time
from typing import NoReturn

from procsup._process.guardian import Guardian

__all__ = ["BOUND", "DEADLINE", "FAILED", "SLOW", "Trials", "trial_main"]

# A module whose import takes the trial longer than this (wall clock) is never imported by the
# zygote: for that long the zygote would notice no task's death and answer no start.
BOUND = 0.05
# Seconds after its fork when a trial still running is SIGKILLed (its import hangs, or is slow).
DEADLINE = 2.0
SLOW = 3  # the trial's exit code: the import succeeded but took longer than BOUND
FAILED = 4  # the trial's exit code: the import raised


def trial_main(name: str) -> NoReturn:
    """In a trial (already a zygote child, ``server._become_child``): import ``name``, timed."""
    code = FAILED
    try:
        # What its top level prints was printed by the task that imported it, and will be by
        # the zygote if it imports it: not a third time from here.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        start = time.monotonic()
        importlib.import_module(name)
        code = 0 if time.monotonic() - start <= BOUND else SLOW
    finally:
        os._exit(code)  # whatever it raised (BaseException included): FAILED


class _Trial:
    """A running trial: its module, pid, when it is killed, and whether a Sync voided it."""

    __slots__ = ("deadline", "killed", "name", "pid", "void")

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.deadline = time.monotonic() + DEADLINE
        self.killed = False
        self.void = False


class Trials:
    """The zygote's verdicts on task modules.

    Invariants: a module name is in at most one of ``queued`` (waiting for a trial, in order),
    the running ``trial``, ``passed`` (its trial exited 0: the zygote imports it when idle) and
    ``never`` (its trial failed: the zygote never imports it); no trial is forked for a module in
    ``sys.modules``. ``trial`` is None or an unreaped child of ours, whose pid is a
    key of ``guardian.trials``.
    """

    def __init__(self, guardian: Guardian) -> None:
        self.guardian = guardian
        self.queued: list[str] = []
        self.passed: list[str] = []
        self.never: set[str] = set()
        self.trial: _Trial | None = None

    def consider(self, name: str) -> None:
        """A task of module ``name`` was started: queue a trial if the module is new here."""
        trial = self.trial
        if (
            name in self.never
            or name in self.queued
            or name in self.passed
            or (trial is not None and trial.name == name)
            or name in sys.modules
        ):
            return
        self.queued.append(name)

    def synced(self) -> None:
        """The zygote's path, argv, cwd or environment changed: what was proven is not."""
        if self.trial is not None:
            self.trial.void = True
        self.queued[:0] = self.passed
        self.passed.clear()

    def next(self) -> str | None:
        """The module to fork a trial for now, if any (then ``started`` or ``requeue`` must
        follow). One imported meanwhile (a ``Preload``) needs none."""
        while self.trial is None and self.queued:
            name = self.queued.pop(0)
            if name not in sys.modules:
                return name
        return None

    def started(self, name: str, pid: int) -> None:
        self.guardian.trials[pid] = None
        self.trial = _Trial(name, pid)

    def requeue(self, name: str) -> None:
        """The trial for ``name`` could not be forked: try again later."""
        self.queued.insert(0, name)

    def timeout(self) -> float | None:
        """Seconds until the running trial is due to be killed, or None."""
        trial = self.trial
        if trial is None or trial.killed:
            return None
        return max(0.0, trial.deadline - time.monotonic())

    def check(self) -> None:
        """Judge the running trial if it was reaped; kill it if it is overdue."""
        trial = self.trial
        if trial is None:
            return
        status = self.guardian.trials.get(trial.pid)
        if status is None:
            if not trial.killed and time.monotonic() >= trial.deadline:
                trial.killed = True
                with contextlib.suppress(OSError):  # our unreaped child: the pid is its
                    os.kill(trial.pid, signal.SIGKILL)
            return
        del self.guardian.trials[trial.pid]
        self.trial = None
        if trial.void:
            self.queued.insert(0, trial.name)
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and not trial.killed:
            self.passed.append(trial.name)
        else:
            self.never.add(trial.name)

    def take_passed(self) -> list[str]:
        """The modules the zygote may import now (they leave ``passed``)."""
        passed, self.passed = self.passed, []
        return passed

    def stop(self) -> None:
        """The supervisor is gone: kill the running trial (the guardian reaps it)."""
        trial, self.trial = self.trial, None
        if trial is not None and self.guardian.trials.get(trial.pid, 0) is None:
            with contextlib.suppress(OSError):
                os.kill(trial.pid, signal.SIGKILL)
