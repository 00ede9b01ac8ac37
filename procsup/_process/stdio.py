"""A task's stderr: through a pipe the supervision thread reads, so a crash can say what it printed.

::

    task process                                   supervisor process (supervision thread)
    ────────────                                   ──────────────────────────────────────
    attach(): fd 2 := the pipe's write end         StderrTap.pump(), a Channel of the task:
      sys.stderr rebound to fd 2 if it was not       every chunk ─▶ forward(chunk): by default
      faulthandler.enable(fd 2, all threads)            written as is to this process's fd 2
    print(..., file=sys.stderr), C code,             ─▶ the bounded tail (8 KiB, last 50 lines)
      a fatal-signal dump ─────── pipe ──────────▶    ─▶ the faulthandler dump, from its
                                                         "Fatal Python error" line (16 KiB)
                                                   TaskCrashedError: tail and dump in the record

Hook for output capture (``capture_output``) and other consumers: ``StderrTap.forward`` is called
with every chunk, in order, on the supervision thread, and ``finish`` once when the tap closes;
``capture_output`` puts a line-prefixing ``procsup._process.logs.LinePrinter`` there. The tail and
the dump are kept whatever they do.

Things that don't work
----------------------
- Reading the tail from a file the task writes: a crash can leave it half-written, and it needs
  cleaning up; the pipe is drained once more when the task has exited, before the record is built.
- ``faulthandler.enable()`` on ``sys.stderr`` as inherited: under fork (and under pytest) it may be
  a Python object over another fd, and faulthandler writes to the fd it finds at enable time.
- Waiting for EOF on the pipe before publishing an outcome: a grandchild holding fd 2 would delay
  it for as long as it lives. What is in the pipe when the task is reaped is all the record gets;
  the pipe is closed then, so a grandchild still writing to it gets EPIPE.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

from procsup._os.fds import pump, write_all

__all__ = ["StderrTap", "attach", "prepare_stderr"]

TAIL_BYTES = 8 * 1024
TAIL_LINES = 50
_DUMP_BYTES = 16 * 1024
_DUMP_MARK = b"Fatal Python error: "


def _to_stderr(data: bytes) -> None:
    with contextlib.suppress(OSError):  # a closed or broken stderr must not stop supervision
        write_all(2, data)


def _nothing() -> None:
    pass


class StderrTap:
    """Supervisor side of one task's stderr pipe (a ``procsup._supervision.monitor.Channel``).

    Invariants: ``_tail`` holds the last ``TAIL_BYTES`` bytes read (or fewer) before any fatal error
    report, so a long dump (a forked task's stack includes its parent's frames) never crowds out
    what the task printed; ``_dump`` is empty until a line starting with "Fatal Python error: " was
    read, then holds it and what followed, up to ``_DUMP_BYTES``; ``child_end`` is open from
    creation until ``close_child_end()`` (after the task has started).
    """

    def __init__(self) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(write_end, True)  # the task writes as to a terminal: blocking
        self._fd = read_end
        self.child_end: Connection | None = Connection(write_end, readable=False)
        self.pid = 0
        self.forward: Callable[[bytes], None] = _to_stderr
        self.finish: Callable[[], None] = _nothing  # called once, when the tap closes
        self._tail = bytearray()
        self._dump = bytearray()
        self._in_dump = False

    def fileno(self) -> int:
        return self._fd

    def close_child_end(self) -> None:
        if self.child_end is not None:
            self.child_end.close()
            self.child_end = None

    def pump(self, budget: int | None) -> bool:
        """Read up to ``budget`` chunks (all there is if None); False at EOF or once closed."""
        return self._fd >= 0 and pump(self._fd, self._take, budget)

    def _take(self, data: bytes) -> None:
        self._keep(data)
        self.forward(data)

    def _keep(self, data: bytes) -> None:
        if self._in_dump:  # a fatal error report: it goes to the dump, not the tail
            self._dump += data[: max(0, _DUMP_BYTES - len(self._dump))]
            return
        before = len(self._tail)
        self._tail += data
        at = self._tail.find(_DUMP_MARK, max(0, before - len(_DUMP_MARK) + 1))
        if at >= 0:
            self._in_dump = True
            self._dump += self._tail[at : at + _DUMP_BYTES]
            del self._tail[at:]
        if len(self._tail) > TAIL_BYTES:
            del self._tail[: len(self._tail) - TAIL_BYTES]

    def tail(self) -> str:
        """The last lines the task wrote to stderr (at most ``TAIL_LINES`` and ``TAIL_BYTES``)."""
        text = self._tail.decode(errors="replace")
        if len(self._tail) >= TAIL_BYTES and "\n" in text:
            text = text[text.index("\n") + 1 :]  # the first line is cut: drop it
        return "\n".join(text.splitlines()[-TAIL_LINES:])

    def faulthandler_dump(self) -> str | None:
        """The faulthandler report of a fatal signal, if the task wrote one."""
        return self._dump.decode(errors="replace").rstrip() if self._dump else None

    def close(self) -> None:
        self.close_child_end()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.finish()


def attach(conn: Connection) -> None:
    """In the task process: fd 2 becomes the pipe; ``sys.stderr`` and faulthandler write there."""
    with contextlib.suppress(Exception):
        if sys.stderr is not None:
            sys.stderr.flush()
    os.dup2(conn.fileno(), 2)
    conn.close()
    prepare_stderr()


def prepare_stderr() -> None:
    """``sys.stderr`` line-buffered on fd 2, and faulthandler writing to fd 2, whatever fd 2 is
    now or becomes: a spare does this before its task's pipe is made its fd 2 (``attach``).
    Idempotent."""
    try:
        on_fd_2 = sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        on_fd_2 = False
    if on_fd_2:
        with contextlib.suppress(Exception):
            sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    else:
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace"
        )
    faulthandler.enable(file=sys.stderr, all_threads=True)
