"""An executor's worker: one task process that runs many items, one at a time.

::

    executor thread (procsup._executor.pool)          worker: serve(token, tasks, results, config)
    ────────────────────────────────────────          ────────────────────────────────────────────
    backend.start(RunSpec(serve, args=(tasks read     a run like any task's: procsup._process.entry
      end, results write end, WorkerConfig)))           (signals, process group, subreaper, stderr
                                                         tap, memory limit) calls serve()
                                                      initializer(*initargs), once
                                                      ``depth`` tokens made ahead: upcoming
               ◀────── READY(node), NODE(node)...  or INIT_FAILED (its traceback), then return
    dispatch = borrow_node(a named node)
    ITEM(id, call) ───────────────────────────────▶  node = upcoming.popleft(); one more made
                                                      started = node.child_token(), in one
                                                        lock hold with the one made ahead
                                                        born cancelled: SKIPPED, not run
               ◀──── STARTED(id)                     (after the last item's DONE, in one write,
                                                        if this item was in hand as that ended)
                                                      current_token() is started
                                                      outcome = fn(*args, **kwargs)
               ◀──── DONE(id, the new node, outcome frame)
    ...                                               (the next item: it may be in the pipe)
    QUIT, or EOF ─────────────────────────────────▶  return: the run ends with None

Each item runs under ``started``, a child of a node this worker made ahead (a child of its own
token) and named to the executor before the item was sent. The executor cancels an item by
cancelling that node: a store to shared memory that the item sees whatever this process is doing,
and the executor's process pays no arena lock for it. Making ``started`` is the item's start:
the executor takes back an item waiting in this pipe with ``cancel_unstarted()`` on its node, and
the arena lock decides which came first. ``started`` is kept until ``depth`` items later, so a
finished item never looks unstarted to an executor that has not read its reply yet. If this
process dies, the supervision thread prunes its token's subtree, these nodes included. The wire
format is in ``procsup._process.items``.

Things that don't work
----------------------
- Making each item's token when the item arrives and cancelling it on a message from the
  executor: the message needs a reader thread in every worker, and that thread needs the GIL,
  which an item inside a C extension may hold for as long as it runs. The executor cancels the
  node itself instead, through a borrowed handle on it.
- Making item tokens in the executor's process: four ``lockf`` calls per item (make, free) on
  the thread that every item's outcome goes through, the busiest in the executor. Here they cost
  an otherwise idle worker.
- Taking back an item waiting in this pipe by a message ("skip item 7"): the worker may have
  started it already, and then it would run twice. Only the arena lock orders the two.
- Knowing what a dead worker was running from what it had read of its pipe (FIONREAD): a
  worker killed while idle, with the SIGKILL still pending, may yet complete the read of an
  item sent to it, then die without running it. Only the worker can say it starts an item:
  STARTED, written before the item runs. When the next item is already in hand as one ends,
  the ended item's DONE waits for that STARTED (one lock hold, microseconds), and both go in
  one write: a write and a wake-up of the executor less per item when items queue. A worker
  killed in that gap has its last item reported as crashed, as it would be if killed between
  the item's return and its DONE.
- Four arena lock holds per item (two ``child_token()`` calls, two drops): ~14 us of a trivial
  item's ~32 us here, measured. ``renew()`` does the four in one hold: ~9 us.
- Sending an item's outcome over the run's own result pipe: the supervision thread reads that
  pipe for the run's one outcome frame and ignores what follows. Items have their own pipe.
- EOF on the tasks pipe as the only way to stop: under the fork start method every worker is a
  copy of the executor's process and holds its copies of the other workers' write ends, so the
  pipe never reaches EOF while another worker lives. ``QUIT`` says it.
- Catching only ``Exception`` around an item: ``SystemExit`` would end the worker, and every
  later item with it. Every ``BaseException`` is the item's outcome.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import psutil

from procsup._os.fds import write_all
from procsup._os.proc import leave_if_forked
from procsup._os.tree import KILL_WAIT, kill_trees
from procsup._outcome.remote import encode_error, encode_value
from procsup._process import items
from procsup._process.reduction import loads_sharing_main
from procsup._process.setup import over_limit
from procsup._token.current import set_current_token
from procsup._token.token import CancellationToken, node, renew

__all__ = ["WorkerConfig", "run_chunk", "serve"]

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of one executor is started with.

    Attributes:
        initializer: The initializer, pickled by ``items.dumps_object``, or None. Its
            arguments are ``serve``'s own: they travel with the start as a task's do (by value
            where they must be), so tokens, Connections and multiprocessing locks may be among
            them.
        memory_limit: The worker's ``memory_limit`` in bytes (applied by the run's setup), or
            None; a ``MemoryError`` in an item then says the limit was hit.
        depth: Items the executor may have in this worker's pipe at once (the one running
            included): the tokens made ahead.
    """

    initializer: bytes | None
    memory_limit: int | None
    depth: int


async def _await(aw: Awaitable[T]) -> T:
    return await aw


def _reply(kind: int, item_id: int, upcoming: CancellationToken | None, frame: bytes) -> bytes:
    slot, live = (0, 0) if upcoming is None else node(upcoming)
    return items.PREFIX.pack(kind, item_id, slot, live) + frame


def _run(call: bytes, memory_limit: int | None) -> bytes:
    """Run one pickled call; return its outcome frame. Never raises."""
    try:
        fn, args, kwargs = loads_sharing_main(call)
    except BaseException as exc:  # noqa: BLE001 - the item's outcome, whatever it is
        exc.add_note("procsup: the item could not be unpickled in its worker process")
        return encode_error(exc)
    worker = os.getpid()
    try:
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            import asyncio  # only for async items: see procsup._supervision.aio

            value = asyncio.run(_await(value))
    except SystemExit as exc:
        leave_if_forked(worker, exc)
        # As for a task: sys.exit() and sys.exit(0) say "done"; the worker goes on regardless.
        if exc.code not in (0, None):
            return encode_error(exc)
        value = None
    except MemoryError as exc:
        leave_if_forked(worker, exc)
        try:
            raise over_limit(exc, memory_limit) from exc
        except MemoryError as reported:
            return encode_error(reported)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included: an outcome
        leave_if_forked(worker, exc)
        return encode_error(exc)
    finally:
        del fn, args, kwargs
    leave_if_forked(worker, None)
    return encode_value(value, "item")


def serve(
    token: CancellationToken,
    tasks: Connection,
    results: Connection,
    config: WorkerConfig,
    *initargs: Any,
) -> None:
    """Run items from ``tasks`` until QUIT or EOF, replying on ``results`` (in the worker);
    then kill what the items and the initializer left running."""
    try:
        _serve(token, tasks, results, config, initargs)
    finally:
        _end_leftovers()


def _end_leftovers() -> None:
    """Kill every process below this worker, and wait (boundedly) for its children.

    The worker is a subreaper (``procsup._process.entry``), so whatever its items started is
    below it, ``setsid()`` ones included. Left to the zygote, they would live on for the grace
    period after ``shutdown(wait=True)`` returned; under ``fork``, the shim's tree is killed at
    once. The same here, under every start method."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):  # a thread's children are listed under it
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
    roots = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            roots.append(psutil.Process(pid))
    if roots:
        kill_trees(roots)
        psutil.wait_procs(roots, timeout=KILL_WAIT)


def _serve(
    token: CancellationToken,
    tasks: Connection,
    results: Connection,
    config: WorkerConfig,
    initargs: tuple[Any, ...],
) -> None:
    rfd, wfd = tasks.fileno(), results.fileno()
    if config.initializer is not None:
        try:
            initializer: Callable[..., object] = loads_sharing_main(config.initializer)
            initializer(*initargs)
        except BaseException as exc:  # noqa: BLE001 - reported, then this worker ends
            write_all(wfd, _reply(items.INIT_FAILED, 0, None, encode_error(exc)))
            return
    upcoming = collections.deque(renew((token,) * config.depth))
    kinds = [items.READY] + [items.NODE] * (config.depth - 1)
    write_all(  # one write: the executor reads them in one wake-up
        wfd,
        b"".join(
            items.PREFIX.pack(kind, 0, *node(ahead)) + items.NO_FRAME
            for kind, ahead in zip(kinds, upcoming, strict=True)
        ),
    )
    recent: collections.deque[CancellationToken] = collections.deque(maxlen=config.depth)
    inbox = _Inbox(rfd)
    out = b""  # replies not written yet: they go with the next STARTED, or before we block
    while True:
        if out and not inbox.in_hand():
            write_all(wfd, out)
            out = b""
        request = inbox.take()
        if request is None or request[0] == items.QUIT:  # EOF (the executor is gone), or QUIT
            if out:
                write_all(wfd, out)
            return
        _, item_id, call = request
        named = upcoming.popleft()
        # The start: from here, the item cannot be taken back. One lock hold makes the next
        # node ahead and ``started``, and gives back ``named`` (``started`` keeps it) and the
        # ``started`` of ``depth`` items ago, which ``recent`` lets go of here.
        spent = (named, recent[0]) if len(recent) == config.depth else (named,)
        ahead, started = renew((token, named), spent)
        upcoming.append(ahead)
        recent.append(started)
        del named, spent, request
        if started.is_cancelled():  # taken back, or cancelled, before it started
            out += _reply(items.SKIPPED, item_id, ahead, items.NO_FRAME)
            continue
        write_all(wfd, out + _reply(items.STARTED, item_id, None, items.NO_FRAME))  # if we die
        out = b""  # now: it did
        set_current_token(started)
        try:
            frame = _run(call, config.memory_limit)
        finally:
            set_current_token(token)
        del call, started
        out = _reply(items.DONE, item_id, ahead, frame)
        del frame, ahead
        if len(out) > _CHUNK:  # not worth a copy to save a syscall
            write_all(wfd, out)
            out = b""


class _Inbox:
    """The tasks pipe, read in large chunks, so that the loop knows without a syscall whether
    the next request is already in hand (then the last item's DONE waits to go with its
    STARTED, in one write)."""

    __slots__ = ("_at", "_data", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = bytearray()
        self._at = 0

    def in_hand(self) -> bool:
        have = len(self._data) - self._at
        if have < items.REQUEST.size:
            return False
        length: int = items.REQUEST.unpack_from(self._data, self._at)[2]
        return have >= items.REQUEST.size + length

    def _fill(self, need: int) -> bool:
        """Have ``need`` bytes unread, blocking; False at end of file."""
        while (have := len(self._data) - self._at) < need:
            if self._at:  # keep only what is unread
                del self._data[: self._at]
                self._at = 0
            chunk = os.read(self._fd, max(_CHUNK, need - have))
            if not chunk:
                return False
            self._data += chunk
        return True

    def take(self) -> tuple[int, int, bytes] | None:
        """The next request ``(kind, item id, call)``, blocking; None at end of file."""
        size = items.REQUEST.size
        if not self._fill(size):
            return None
        kind, item_id, length = items.REQUEST.unpack_from(self._data, self._at)
        if not self._fill(size + length):
            return None
        start = self._at + size
        self._at = start + length
        return kind, item_id, bytes(self._data[start : self._at])


_CHUNK = 65536


def run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    """``Executor.map(chunksize=n)``: one item runs ``fn`` over a chunk of argument tuples."""
    return [fn(*args) for args in chunk]
