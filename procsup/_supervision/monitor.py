"""The supervision thread: one per Supervisor, blocking on every task's exit and result at once.

::

    LocalBackend.start() ─ launch()          Monitor thread
    ───────────────────                      ──────────────
    TaskRecord(proc, conn, exit_fd) ─▶ add(): its fds registered with the thread's epoll from the
                                       caller's thread (no wake-up, no hand-off)
                                             epoll.poll() blocks on
                                               wake-up pipe │ exit fd per task │ result fd per task
                                               │ log socket, stderr (and stdout) pipe per task
                                               (exit fd: the zygote's status pipe, or the fork
                                                shim's; never anything the task holds)
                                             result fd readable ─▶ os.read what is there,
                                                 FrameReader.feed(); a whole error frame cancels
                                                 the parent at once
                                             exit fd readable ─▶ _finish(): drain the result
                                                 pipe and stderr (until EAGAIN), reap, classify,
                                                 cancel the parent (unless a stop was requested);
                                                 a parent somebody waits on: sleep 50 us, the GIL
                                                 free (_hand_off); THEN _publish(): drain the
                                                 logs, close, log, publish on the Future
    handle.join() ◀─ Future.result(timeout) ─────┘
                                             a fork task's shim still holding the task's orphans
                                               (``procsup._process.shim``): its pidfd is watched,
                                               and it is reaped once it exits; close() kills it

Things that don't work
----------------------
- Learning of death from pipe EOF (``multiprocessing.connection.wait`` over result pipes, as
  ProcessPoolExecutor does): a grandchild holding the write end keeps the pipe open for as long as
  it lives. Death comes from the exit fd; the result pipe is only drained, never waited to EOF.
- ``Connection.recv()`` in the thread: one big result would block every other task's supervision.
  Reads are non-blocking and bounded per wake-up (``_READS_PER_WAKE``).
- Starting tasks as ``multiprocessing.Process``: ``multiprocessing.active_children()`` or another
  thread's ``Process.start()`` polls every child, two concurrent polls of one status fd race, and
  one of them records exit code 255. procsup's processes (``procsup._process.zygote``) are not in
  ``multiprocessing.process._children``; every task is reaped by this thread alone.
- ``selectors`` with new tasks queued for the thread behind a wake-up byte: every start then pays a
  GIL hand-off to the thread (~1 ms on a loaded 2-core machine). Tasks are registered with the raw
  epoll from the caller's thread instead; the kernel allows it while the thread waits.
- Closing a task's fds without unregistering them first: epoll watches the open file, not the
  fd, and a fork task (or any fork of this process) may hold a copy of it; the thread would be
  woken for a task it has forgotten. Each is unregistered, one ``epoll_ctl`` each (Python has no
  batch form; 4 a task, 5 with captured output, ~0.6 us apiece here: not worth one of ours).
- One pipe for the result and the status: a task that dies halfway through its frame leaves a
  partial frame, which the zygote's status written after it would complete with garbage; and a
  status pipe the task held a copy of would not close when the zygote dies. Nor the result on the
  log socket (message boundaries, so it would parse): a 64 MiB result would cross in messages of
  at most the socket's buffer (~200 KiB), three at a time, against one 1 MiB pipe read a wake-up.
- Letting ``join()`` read and reap the outcome itself, to spare the hand-off from this thread to
  the joiner (~50-80 us here, the futex wake and the GIL): the runtime contract publishes a run's
  outcome on the backend's outcome thread, where restarts are decided.
- Cancelling the parent after the tidying (unregistering, the log pumps, closing the fds,
  pruning the token), as this thread used to: whoever waits on the parent waited for all of it.
  The parent is cancelled as soon as the error's message is built (the notes and numbers of the
  crash record come after), and the outcome published after.
- Going on with the tidying right after that cancellation: a thread of this process that it
  woke (``parent.wait()``, an asyncio watch) needs the GIL, and this thread kept it but for the
  odd system call, each too short for the other to take it, until it slept in ``epoll`` again; the
  woken thread then slept a second time, on the GIL. So once the parents of a round's deaths are
  cancelled, if any of them was ever waited on, this thread sleeps ``_HAND_OFF`` (plus the
  kernel's timer slack) before publishing: SIGKILL to the waiter's wake-up went from 0.97 to 0.88
  ms (medians of 800 crashes, A/B in bursts on this loaded 2-core VM), and each crash's join()
  gets that much later. ``epoll`` itself cannot sleep less than a millisecond (its timeout is in
  ms), nor ``select()`` on its fd beyond fd 1023.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import select
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Protocol

import psutil

from procsup._os import tree as _contain
from procsup._os.fds import drain, pump
from procsup._os.timeouts import capped
from procsup._os.tree import ExitInfo
from procsup._outcome import crash as _crash
from procsup._outcome import remote as _remote
from procsup._outcome.errors import (
    CriticalTaskError,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._process.stdio import StderrTap
from procsup._process.zygote import ForkProcess, Shim, ZygoteProcess
from procsup._supervision.runtime import Facts, RunSpec
from procsup._supervision.timers import Timers
from procsup._token.token import prune, waited_on

__all__ = ["Channel", "Monitor", "TaskRecord"]

logger = logging.getLogger("procsup")

_READ_CHUNK = 1 << 20
_READS_PER_WAKE = 16  # bounded so one chatty pipe cannot starve the other tasks' deaths
_MONITOR_LOST = "Critical task monitor was cancelled"
_DRAIN_BUDGET = 1024  # reads per channel at exit: a grandchild still writing cannot hold us up
# Seconds the thread sleeps after cancelling a parent somebody waits on, so that a thread of this
# process it woke has the GIL first (see _hand_off); the kernel adds up to 50 us of timer slack.
_HAND_OFF = 50e-6


class Channel(Protocol):
    """A pipe the thread drains for a task beside its result (its logs, its captured output)."""

    def fileno(self) -> int: ...

    def pump(self, budget: int | None) -> bool:
        """Consume what is there (up to ``budget`` reads); False once the writer's end is closed."""
        ...

    def close(self) -> None: ...


class TaskRecord:
    """The local backend's record of one run, one task process: a ``runtime.Run``.

    Invariants:
        future: RUNNING until the outcome is published, then done; never cancelled. Published only
            after the process has been reaped and, for a failure, the parent cancelled.
        reader: holds every result byte read so far; its ``body`` is set once the frame is whole.
        outcome: None until a whole frame was decoded, then a Returned or the error to raise;
            None again once published (the Future holds it, so a big result is kept once).
        conn: open (and, once adopted, registered) until EOF or reaping; only the thread reads it.
        exited: set under ``lock`` by the thread before it reaps, so a signal sent under ``lock``
            never reaches a recycled pid.
        stop_reason: None, or why a ladder signalled the run on request (then a crash is a stop).
        limit_reason: None, or which limit a ladder killed the run for (a timeout); unlike a stop,
            that crash is a failure and cancels the parent.
        channels: the task's log and output pipes still open; closed before the outcome is out.
        stderr: the task's stderr pipe (also among ``channels`` while open), kept for its tail.
        started: ``time.monotonic()`` when the record was made, just after the process started.
        info: None until reaped; then how the process ended (``procsup._os.tree.ExitInfo``).
        exitcode: None until reaped.
    """

    def __init__(
        self, spec: RunSpec, proc: ForkProcess | ZygoteProcess, conn: Connection, exit_fd: int
    ) -> None:
        self.spec = spec
        self.description = spec.description
        self.token = spec.token
        self.parent = spec.parent
        self.cancels_parent = spec.cancels_parent
        self.proc = proc
        self.pid: int = proc.pid or 0
        self.conn: Connection | None = conn
        self.exit_fd = exit_fd
        self.reader = _remote.FrameReader()
        self.outcome: _remote.Returned | CriticalTaskError | None = None
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # so asyncio.wrap_future can never cancel it
        self.lock = threading.Lock()
        self.exited = False
        self.stop_reason: str | None = None
        self.limit_reason: str | None = None
        self.channels: list[Channel] = []
        self.stderr: StderrTap | None = None
        self.started = time.monotonic()
        self.info: ExitInfo | None = None
        self.exitcode: int | None = None
        self._ps: psutil.Process | None = None  # for cpu_percent between two facts()

    @property
    def node_id(self) -> None:
        """None: a local run's process is on this machine."""
        return None

    @property
    def received(self) -> int:
        """Bytes of the result frame read so far (for the crash record)."""
        return self.reader.received

    @property
    def signalled(self) -> bool:
        """True once a ladder has signalled the run (a stop, or a timeout's kill)."""
        return self.stop_reason is not None or self.limit_reason is not None

    def facts(self) -> Facts:
        """The process's pid, RSS and CPU use now (``Supervisor.tasks()``)."""
        rss = cpu = None
        try:
            proc = self._ps
            if proc is None:
                proc = self._ps = psutil.Process(self.pid)
                times = proc.cpu_times()
                proc.cpu_percent(None)  # the baseline for the next call
                uptime = time.monotonic() - self.started
                cpu = 100.0 * (times.user + times.system) / max(uptime, 1e-3)
            else:
                cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        return Facts(self.pid, rss, cpu)

    def release(self) -> None:
        """Close every fd the record holds (idempotent); the process must be reaped first."""
        for channel in self.channels:
            channel.close()
        self.channels = []
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.proc.close()


# What ``Monitor._finish()`` hands ``_publish()``: the record, its outcome (a Returned, or the error
# to raise), when it was reaped, and whether a cancellation it made may have woken a thread.
_Ended = tuple[TaskRecord, _remote.Returned | CriticalTaskError, float, bool]


class Monitor:
    """The supervision thread and what it watches.

    Invariants: ``live`` holds every added task whose outcome is not published yet; after
    ``exiting`` is set, ``add()`` refuses new tasks and the thread, once ``live`` is empty (both
    under ``lock``), kills the fork shims left in ``shims`` (pidfd -> shim, the thread's alone),
    reaps them, and returns. ``_roles`` maps every fd registered with ``_epoll`` to what it is
    for; an entry is added just before its fd is registered (by any thread) and removed by the
    thread just after it is unregistered, before the fd is closed, so a reused fd number is never
    mistaken for its predecessor. ``_wake_r``/``_wake_w`` are the wake-up pipe until the first
    ``close()`` that finds the thread ended closes it (with ``_epoll``), then -1 (under
    ``_wake_lock``).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[TaskRecord] = set()
        self._exiting = False
        self._epoll = select.epoll()
        self._roles: dict[int, tuple[str, TaskRecord | None]] = {}
        self.shims: dict[int, Shim] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # the pipe's fds: closed once, never written after
        self._watch(self._wake_r, "wake", None)
        self.timers = Timers(self._wake)  # restarts and timeouts: the poll timeout honours them
        self._thread = threading.Thread(target=self._run, name="procsup-supervisor", daemon=True)
        self._thread.start()

    def add(self, task: TaskRecord) -> bool:
        """Start watching ``task``; False if the monitor is exiting (the caller must clean up)."""
        with self.lock:
            if self._exiting:
                return False
            self.live.add(task)
        # Registered from the caller's thread: epoll_ctl is safe while the thread waits in
        # epoll_wait, and it spares a wake-up (a GIL hand-off) on every start.
        assert task.conn is not None
        # The exit fd last: once it is watched the thread may finish the task, unwatching the rest.
        for channel in list(task.channels):
            self._watch(channel.fileno(), "channel", task)
        self._watch(task.conn.fileno(), "result", task)
        self._watch(task.exit_fd, "exit", task)
        return True

    def _watch(self, fd: int, role: str, task: TaskRecord | None) -> None:
        self._roles[fd] = (role, task)
        self._epoll.register(fd, select.EPOLLIN)

    def _unwatch(self, fd: int) -> None:
        self._epoll.unregister(fd)
        del self._roles[fd]

    def close(self, timeout: float) -> bool:
        """Let the thread return once no task is live; True once it has and fds are closed.

        From any number of threads at once. On the thread itself (a callback it runs), nothing
        is waited for: it returns False, and a later call from another thread closes the fds.
        """
        with self.lock:
            self._exiting = True
        self._wake()
        if self.on_thread():
            return False
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        with self._wake_lock:  # shutdown() in two threads at once: one of them closes them
            if self._wake_w >= 0:
                self._epoll.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
        return True

    @property
    def alive(self) -> bool:
        """True while the supervision thread runs."""
        return self._thread.is_alive()

    def on_thread(self) -> bool:
        """True on the supervision thread itself (its timers' callbacks, event callbacks)."""
        return threading.current_thread() is self._thread

    def _wake(self) -> None:
        with self._wake_lock:  # never a write to the number of a closed fd (reused, maybe)
            if self._wake_w < 0:
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe already means "wake up"
                os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        try:
            while True:
                deaths = []
                for fd, _ in self._epoll.poll(capped(self.timers.timeout())):
                    role, task = self._roles[fd]
                    if role == "wake":
                        drain(self._wake_r)
                    elif role == "result":
                        assert task is not None
                        self._read(task, _READS_PER_WAKE)
                    elif role == "channel":
                        assert task is not None
                        self._pump(task, fd)
                    elif role == "shim":
                        self._unwatch(fd)
                        self.shims.pop(fd).reap(None)  # it has exited
                    else:
                        assert task is not None
                        deaths.append(task)
                # Results before deaths, so a frame that arrived with the death is not missed.
                # Every parent is cancelled before any outcome is published.
                ended = [self._finish(task) for task in deaths]
                if any(woke for *_, woke in ended):
                    self._hand_off()
                while ended:
                    self._publish(ended.pop(0))
                task = None  # while we wait, a finished task's record is kept by nobody here
                deaths.clear()
                self.timers.run_due()
                with self.lock:
                    done = self._exiting and not self.live
                if done:
                    return
        except BaseException:
            logger.exception("procsup supervisor thread died; its tasks are no longer supervised")
        finally:
            self._lose_all()
            self._end_shims()
            self.timers.run_all()  # pending restarts resolve (the supervisor is gone: no restart)

    def _end_shims(self) -> None:
        """Kill the fork shims still holding orphans (shutdown: they die now, not after the grace
        period) and reap them."""
        for fd, shim in list(self.shims.items()):
            self._unwatch(fd)
            shim.kill()
            if not shim.reap(_contain.KILL_WAIT):
                logger.error("procsup fork shim pid %d still alive after SIGKILL", shim.pid)
                shim.drop()
        self.shims.clear()

    def _pump(self, task: TaskRecord, fd: int) -> None:
        for channel in task.channels:
            if channel.fileno() == fd and not channel.pump(_READS_PER_WAKE):
                self._unwatch(fd)
                task.channels.remove(channel)
                channel.close()
                return

    def _read(self, task: TaskRecord, budget: int | None) -> None:
        """Read what the pipe holds (up to ``budget`` chunks); decode once the frame is whole."""
        if task.conn is None:
            return
        fd = task.conn.fileno()
        if not pump(fd, functools.partial(self._feed, task), budget, _READ_CHUNK):
            self._unwatch(fd)
            task.conn.close()
            task.conn = None

    def _feed(self, task: TaskRecord, data: bytes) -> None:
        if task.reader.feed(data) and task.reader.body is not None:  # whole, not decoded
            self._decode(task)

    def _decode(self, task: TaskRecord) -> None:
        assert task.reader.body is not None
        decoded = _remote.decode(task.reader.body)
        task.reader.release()
        if isinstance(decoded, _remote.Returned):
            task.outcome = decoded
            return
        cls = TaskPanickedError if decoded.panicked else TaskFailedError
        kind = "panicked" if decoded.panicked else "failed"
        what = f"{decoded.short_name}: {decoded.message}" if decoded.message else decoded.short_name
        error = cls(
            f"Critical task '{task.description}' {kind}: {what}",
            description=task.description,
            pid=task.pid,
            remote_traceback=decoded.text,
        )
        error.__cause__ = _remote.rebuild(decoded)
        task.outcome = error
        if task.stop_reason is None and task.cancels_parent:
            # Cancel now, not at reaping: the process may take a while to exit after reporting.
            task.parent.cancel(str(error))

    def _finish(self, task: TaskRecord) -> _Ended:
        """The process has exited: drain its result and stderr, reap it, classify it and cancel
        the parent. ``_publish()`` does the rest."""
        self._read(task, None)  # all it wrote is in the pipe now: it cannot block, only EAGAIN
        if task.stderr is not None:  # for the crash record: its tail, a faulthandler dump
            task.stderr.pump(_DRAIN_BUDGET)
        with task.lock:
            task.exited = True
        task.info = _contain.reap(task.proc)
        reaped = time.monotonic()
        task.exitcode = exitcode = task.info.exitcode
        outcome, task.outcome = task.outcome, None  # from now on the Future alone holds it
        if isinstance(outcome, _remote.Returned):
            return task, outcome, reaped, False
        error = outcome if outcome is not None else _crash.crashed(task, exitcode)
        error.exitcode = exitcode
        if task.stop_reason is not None:
            return task, _crash.stopped(task, exitcode, error), reaped, False
        if not task.cancels_parent:
            return task, error, reaped, False
        # Before anything else: whoever waits on the parent learns of a crash first. The cause
        # is the message, complete already; the notes and numbers come after.
        task.parent.cancel(str(error))
        return task, error, reaped, waited_on(task.parent)

    def _hand_off(self) -> None:
        """Let a thread of this process that a cancellation just woke take the GIL first."""
        time.sleep(_HAND_OFF)

    def _publish(self, ended: _Ended) -> None:
        """After ``_finish()``: drain the task's logs, close its fds, publish its outcome."""
        task, outcome, reaped, _ = ended
        if isinstance(outcome, TaskCrashedError):
            _crash.annotate(outcome, task.info, task.started, task.stderr, reaped)
        self._unwatch(task.exit_fd)
        if task.conn is not None:
            self._unwatch(task.conn.fileno())
        for channel in task.channels:  # its last log records are handled before join() returns
            channel.pump(_DRAIN_BUDGET)
            self._unwatch(channel.fileno())
        shim = task.proc.shim if isinstance(task.proc, ForkProcess) else None
        if shim is not None:  # a fork task's: it exits once the task's orphans are dead
            task.proc.shim = None  # type: ignore[union-attr]
            if not shim.reap():
                self.shims[shim.fd] = shim
                self._watch(shim.fd, "shim", None)
        task.release()
        # The dead task can no longer give back its references to its token's subtree.
        prune(task.token)
        with self.lock:
            self.live.discard(task)
        if isinstance(outcome, _remote.Returned):
            logger.debug("Critical task '%s' completed successfully", task.description)
            task.future.set_result(outcome.value)
            return
        quiet = task.spec.options.quiet  # its owner reports it, naming what it was for
        if task.stop_reason is not None:
            logger.log(logging.DEBUG if quiet else logging.WARNING, "%s", outcome)
        else:
            logger.log(logging.DEBUG if quiet else logging.ERROR, "%s", outcome)
        task.future.set_exception(outcome)

    def _lose_all(self) -> None:
        with self.lock:
            self._exiting = True
            lost = list(self.live)
        for task in lost:
            if not task.future.done():
                task.future.set_exception(
                    CriticalTaskError(_MONITOR_LOST, description=task.description, pid=task.pid)
                )
