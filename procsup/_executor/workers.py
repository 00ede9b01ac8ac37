"""An executor's items and workers as its thread sees them: records, pipes, frames.

::

    start_worker(backend, ...)                        the worker (procsup._process.worker.serve)
      two pipes (O_CLOEXEC); the child's ends ──────▶ args of its run: RunSpec(serve, ...)
      closed here once backend.start() returns
      Worker.send(ITEM head, call) ── tasks pipe ────▶ one blocking reader, items in order
        non-blocking; what the pipe does not take
        waits in ``_out`` for EPOLLOUT
      Worker.receive() ◀───────────── results pipe ── READY, NODE, SKIPPED, DONE, INIT_FAILED
        non-blocking reads into ``_in``, parsed
        into whole replies (``items.REPLY``); each
        names a node for ``nodes``
      inflight: the Dispatches sent, in order; the first is running (or about to: its STARTED
        says it began), the others wait in its pipe

Things that don't work
----------------------
- Blaming the first item in flight for every death: a worker that dies between two items (a
  thread an earlier item left behind, the OOM killer choosing an idle worker) may be sent an
  item just before its death is known. Only an item whose STARTED arrived is blamed; the others
  go back to the queue instead of failing with a crash they never saw.
- Asking the tasks pipe (FIONREAD) whether the worker had read the item: measured by
  test_idle_worker_killed_from_outside_fails_no_item, a worker with a SIGKILL pending still
  completes a read of what arrives before it is scheduled to die.
"""

from __future__ import annotations

import collections
import os
from multiprocessing.connection import Connection
from typing import Any

from procsup._os.fds import pump
from procsup._process import items
from procsup._process.worker import WorkerConfig, serve
from procsup._supervision.options import TaskOptions
from procsup._supervision.runtime import Backend, Run, RunSpec
from procsup._supervision.timers import Timer
from procsup._token.token import CancellationToken

__all__ = ["Dispatch", "Item", "Worker", "start_worker"]

_READ_CHUNK = 1 << 20


class Item:
    """One submitted call, from ``submit()`` to its outcome.

    Invariants: ``call`` holds the pickled call until the outcome is published (an item whose
    worker died before reading it is sent again), then b""; ``dispatch`` is its live dispatch
    (None while queued, and once it has ended); ``timed_out`` is set once, by its deadline;
    ``deadline`` and ``kill`` are its pending timers (cancelled once it ends).
    """

    __slots__ = (
        "call",
        "deadline",
        "description",
        "dispatch",
        "future",
        "kill",
        "number",
        "timed_out",
    )

    def __init__(self, number: int, description: str, call: bytes) -> None:
        self.number = number
        self.description = f"{description} #{number}"
        self.call = call
        self.future: Any = None  # the ItemFuture, set by whoever makes the item
        self.dispatch: Dispatch | None = None
        self.timed_out = False
        self.deadline: Timer | None = None
        self.kill: Timer | None = None

    def stop_timers(self) -> None:
        for timer in (self.deadline, self.kill):
            if timer is not None:
                timer.cancel()
        self.deadline = self.kill = None


class Dispatch:
    """One sending of an item to a worker.

    Invariants: ``token`` is a borrowed handle on the node the worker named for it (the item's
    token is made of that node when it starts); ``size`` is the bytes of its ITEM frame;
    ``running`` once it is the first in flight in its worker and its future is claimed (its
    deadline runs from then); ``began`` once its worker said STARTED (if the worker dies before
    the outcome, the item is what killed it); ``ghost`` once it was taken back
    (``cancel_unstarted``): its worker will skip it, and its reply only keeps the order;
    ``kept`` once taking it back failed (it had started).
    """

    __slots__ = (
        "began",
        "ghost",
        "item",
        "kept",
        "number",
        "running",
        "size",
        "token",
        "worker",
    )

    def __init__(
        self, number: int, item: Item, worker: Worker, token: CancellationToken, size: int
    ) -> None:
        self.number = number
        self.item = item
        self.worker = worker
        self.token = token
        self.size = size
        self.running = False
        self.began = False
        self.ghost = False
        self.kept = False


class Worker:
    """One worker process: its run, its pipes (our ends, non-blocking), what it has in hand.

    Invariants (the executor's thread alone touches a registered worker): ``ready`` once its
    READY arrived; ``nodes`` holds the nodes it named that no dispatch has used yet, and
    ``len(nodes) + len(inflight)`` is its depth once ready; ``inflight`` holds the dispatches
    sent and not answered, in the order sent (a STARTED is always about the first);
    ``quit_sent`` once QUIT went after them: it gets nothing more; ``doomed`` once a kill was
    ordered; ``counted`` while it counts toward ``max_workers``; ``spare`` while it is the pool's
    spare (ready or not, given nothing, not counted); ``lost`` once its results pipe
    reached end of file (what it had not started was taken back); ``dead`` once its run's outcome
    is in.
    """

    def __init__(self, number: int, run: Run, tasks_fd: int, results_fd: int) -> None:
        self.number = number
        self.run = run
        self.description = run.spec.description
        self.token = run.spec.token
        self.tasks_fd = tasks_fd
        self.results_fd = results_fd
        self.ready = False
        self.nodes: collections.deque[tuple[int, int]] = collections.deque()
        self.inflight: collections.deque[Dispatch] = collections.deque()
        self.served = 0
        self.quit_sent = False
        self.doomed = False
        self.counted = True
        self.spare = False
        self.lost = False
        self.dead = False
        self.broken_pipe = False
        self._out: collections.deque[memoryview] = collections.deque()
        self._corked: list[bytes] | None = None  # while cork()ed: what send() was given
        self._in = bytearray()

    @property
    def pid(self) -> int:
        return self.run.pid

    @property
    def open(self) -> bool:
        """Whether it may be sent an item now (ready, not leaving, a node left for it)."""
        return (
            self.ready
            and bool(self.nodes)
            and not (self.quit_sent or self.doomed or self.dead or self.broken_pipe)
        )

    # ---------------------------------------------------------------- to the worker

    def cork(self) -> None:
        """Hold what ``send()`` is given until ``uncork()``, which writes it all at once."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> bool:
        """Write what was sent while corked, in one ``writev``; True if some waits for EPOLLOUT."""
        parts, self._corked = self._corked, None
        return parts is not None and bool(parts) and self.send(*parts)

    def send(self, *parts: bytes) -> bool:
        """Write ``parts`` as far as the pipe takes them; True if some wait for EPOLLOUT (never
        while corked: ``uncork()`` says it then)."""
        if self._corked is not None:
            self._corked.extend(parts)
            return False
        if self._out or self.broken_pipe:
            self._out.extend(memoryview(part) for part in parts)
            return not self.broken_pipe
        try:
            written = os.writev(self.tasks_fd, parts)
        except BlockingIOError:
            written = 0
        except OSError:  # EPIPE: it is dead; its death is on the way
            self.broken_pipe = True
            written = 0
        for part in parts:
            if written >= len(part):
                written -= len(part)
                continue
            self._out.append(memoryview(part)[written:])
            written = 0
        return bool(self._out) and not self.broken_pipe

    def flush(self) -> bool:
        """Write what waits; True while some still does."""
        while self._out and not self.broken_pipe:
            view = self._out[0]
            try:
                written = os.write(self.tasks_fd, view)
            except BlockingIOError:
                return True
            except OSError:
                self.broken_pipe = True
                return False
            if written < len(view):
                self._out[0] = view[written:]
                return True
            self._out.popleft()
        return False

    def quit(self) -> bool:
        """Send QUIT (once): it returns after what it has in hand. True if it waits for EPOLLOUT."""
        if self.quit_sent:
            return False
        self.quit_sent = True
        return self.send(items.REQUEST.pack(items.QUIT, 0, 0))

    # ---------------------------------------------------------------- from the worker

    def receive(self, budget: int | None) -> bool:
        """Read what the pipe holds (up to ``budget`` chunks); False at end of file.

        A short read ends it: the pipe is very likely empty, and epoll (level-triggered) wakes
        the thread again if it is not. That spares the read that would only say EAGAIN.
        """
        while budget is None or budget > 0:
            try:
                data = os.read(self.results_fd, _READ_CHUNK)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._in += data
            if len(data) < _READ_CHUNK:
                return True
            if budget is not None:
                budget -= 1
        return True

    def drain(self) -> bool:
        """After its death: read all it wrote (until EAGAIN or EOF); False at end of file."""
        return pump(self.results_fd, self._in.extend, None, _READ_CHUNK)

    def replies(self) -> list[tuple[int, int, bytes]]:
        """Take each whole reply received: ``(kind, dispatch number, outcome frame body)``; the
        node each names goes to ``nodes``."""
        buf = self._in
        start = 0
        taken = []
        size = items.REPLY.size
        with memoryview(buf) as view:
            while len(buf) - start >= size:
                kind, number, slot, live, length = items.REPLY.unpack_from(buf, start)
                end = start + size + length
                if len(buf) < end:
                    break
                if slot:
                    self.nodes.append((slot, live))
                taken.append((kind, number, view[start + size : end].tobytes()))
                start = end
        del buf[:start]
        return taken

    def partial(self) -> int:
        """Bytes received of a reply not yet whole."""
        return len(self._in)

    def close(self) -> None:
        """Close our ends of its pipes (idempotent; after it has been unwatched)."""
        for fd in (self.tasks_fd, self.results_fd):
            if fd >= 0:
                os.close(fd)
        self.tasks_fd = self.results_fd = -1
        self._out.clear()


def start_worker(
    backend: Backend,
    number: int,
    parent: CancellationToken,
    config: WorkerConfig,
    initargs: tuple[Any, ...],
    options: TaskOptions,
) -> Worker:
    """Start worker ``number`` as a run of ``backend``, its token a child of ``parent``.

    Raises what ``backend.start`` raises (TypeError: ``initargs`` cannot be pickled for the start
    method; RuntimeError: the backend is closed; OSError: no process could be made).
    """
    tasks_r, tasks_w = os.pipe2(os.O_CLOEXEC)
    results_r, results_w = os.pipe2(os.O_CLOEXEC)
    theirs = (Connection(tasks_r, writable=False), Connection(results_w, readable=False))
    spec = RunSpec(
        task_fn=serve,
        description=f"procsup.Executor worker {number}",
        args=(*theirs, config, *initargs),
        kwargs={},
        parent=parent,
        token=parent.child_token(),
        options=options,
        cancels_parent=False,  # the executor decides what a death means (critical=True)
    )
    try:
        run = backend.start(spec)
    except BaseException:
        os.close(tasks_w)
        os.close(results_r)
        raise
    finally:
        for conn in theirs:  # the worker has its own copies; a dead worker means EPIPE
            conn.close()
    os.set_blocking(tasks_w, False)
    os.set_blocking(results_r, False)
    return Worker(number, run, tasks_w, results_r)
