"""A task's logging records and (optionally) its stdout/stderr, delivered in the supervisor process.

::

    task process                                          supervisor process
    ────────────                                          ──────────────────
    logging.getLogger(...).warning(...)
      root handler: Forwarder ─ JSON, one record per ─▶  LogChannel.pump()   (supervision thread)
                                message (SOCK_SEQPACKET)    makeLogRecord + task_description,
                                                            task_pid, processName=description
                                                            ─▶ logging.getLogger(name).handle()
    fd 1 / fd 2 (capture_output=True) ── pipe ─────────▶  OutputChannel.pump(): whole lines, as
                                                            "[description pid] line" on the
                                                            supervisor's sys.stdout / sys.stderr

Both ends are registered with the supervision thread's selector, read without blocking, and drained
once more when the process exits, before its outcome is published: a record logged before the task
returned is handled before ``join()`` returns.

Things that don't work
----------------------
- ``logging.handlers.QueueHandler`` on a ``multiprocessing.Queue``: the queue's feeder thread and
  its lock are left broken in another process when a task dies mid-``put`` (the crash this library
  exists for), and a queue needs a reader thread of its own in the supervisor.
- A pipe: records bigger than ``PIPE_BUF`` (4 KiB, a traceback easily is) written by two threads,
  or by the task and a forked grandchild that inherited the handler, interleave. A SEQPACKET socket
  keeps every record one message, whoever writes it.
- Pickled records: unpickling runs code the task chose in the supervisor; JSON builds only data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from typing import Any

from procsup._os.fds import pump

__all__ = [
    "Forwarder",
    "LogChannel",
    "OutputChannel",
    "encode_record",
    "install_forwarder",
    "prepare_forwarder",
]

_MAX_RECORD = 60 * 1024  # below the default socket buffer, so one message always fits
_MAX_LINE = 64 * 1024  # a longer "line" is written out in pieces
_FORMATTER = logging.Formatter()


def encode_record(record: logging.LogRecord) -> bytes:
    """The record as JSON: message formatted, exception as text, extras as ``repr`` if need be."""
    fields: dict[str, Any] = dict(record.__dict__)
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info:
        fields["exc_text"] = record.exc_text or _FORMATTER.formatException(record.exc_info)
    fields["exc_info"] = None
    fields.pop("message", None)
    data = json.dumps(fields, default=repr).encode()
    if len(data) > _MAX_RECORD:
        for key in ("msg", "exc_text", "stack_info"):
            text = fields.get(key)
            if isinstance(text, str) and len(text) > _MAX_RECORD // 8:
                fields[key] = text[: _MAX_RECORD // 8] + " [... truncated by procsup]"
        data = json.dumps(fields, default=repr).encode()[:_MAX_RECORD]
        with contextlib.suppress(ValueError):
            json.loads(data)
            return data
        keep = ("name", "levelno", "levelname", "msg", "created", "process", "pathname", "lineno")
        data = json.dumps({key: fields.get(key) for key in keep}, default=repr).encode()
    return data


class Forwarder(logging.Handler):
    """Child side: sends every record it handles to the supervisor, one message each.

    ``fd`` is the socket; -1 in the zygote and in a spare whose task is not known yet
    (``prepare_forwarder``): their records go where they would with no handler at all
    (``logging.lastResort``).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        if self.fd < 0:
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)
            return
        try:
            data = encode_record(record)
        except Exception:  # noqa: BLE001 - a broken record is reported the way logging does
            self.handleError(record)
            return
        # EPIPE/ECONNREFUSED: the supervisor is gone and nobody is left to tell.
        with contextlib.suppress(OSError):
            os.write(self.fd, data)


def install_forwarder(fd: int, root_level: int, levels: dict[str, int]) -> None:
    """Route every record of this (task) process to the supervisor, at the supervisor's levels."""
    root = logging.getLogger()
    handlers = root.handlers
    if len(handlers) == 1 and type(handlers[0]) is Forwarder:  # prepare_forwarder() made it
        handlers[0].fd = fd
    else:
        # Handlers inherited through fork would write from the task directly, beside the
        # forwarded copy; every start method now behaves as spawn does.
        for handler in list(handlers):
            root.removeHandler(handler)
        root.addHandler(Forwarder(fd))
    # setLevel clears every logger's cache: only where the level changes.
    if root.level != root_level:
        root.setLevel(root_level)
    for name, level in levels.items():
        logger = logging.getLogger(name)
        if logger.level != level:
            logger.setLevel(level)


def prepare_forwarder() -> None:
    """In a spare, before its task is known: the root logger's only handler is a ``Forwarder``
    without a socket yet, which ``install_forwarder`` then only has to be given."""
    install_forwarder(-1, logging.getLogger().level, {})


def logger_levels() -> tuple[int, dict[str, int]]:
    """The supervisor's root level and every level set explicitly on a named logger."""
    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }
    return logging.getLogger().level, levels


class LogChannel:
    """Supervisor side of one task's record socket; ``pid`` is set once the task has started."""

    def __init__(self, sock: socket.socket, description: str) -> None:
        self._sock = sock
        self.description = description
        self.pid = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def pump(self, budget: int | None) -> bool:
        """Handle up to ``budget`` records (all if None); False once the task's end is closed."""
        # A read of a SEQPACKET socket is one record: a longer one (never sent) would be cut.
        return pump(self._sock.fileno(), self._dispatch, budget, _MAX_RECORD + 1024)

    def _dispatch(self, data: bytes) -> None:
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                return
            fields["args"] = None
            fields["exc_info"] = None
            record = logging.makeLogRecord(fields)
        except (ValueError, TypeError):  # garbage from a task that wrote to the socket itself
            return
        record.task_description = self.description
        record.task_pid = self.pid
        record.processName = self.description
        name = record.name if isinstance(record.name, str) and record.name != "root" else None
        logger = logging.getLogger(name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def close(self) -> None:
        self._sock.close()


class LinePrinter:
    """Writes what a task printed to this process's ``sys.<stream>``, line by line, prefixed.

    Invariant: ``_partial`` holds the bytes after the last newline written out (a line still open).
    """

    def __init__(self, stream: str, description: str) -> None:
        self._stream = stream  # "stdout" or "stderr": looked up on sys at each write
        self.description = description
        self.pid = 0
        self._partial = b""

    def write(self, data: bytes) -> None:
        self._partial += data
        self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        *lines, self._partial = self._partial.split(b"\n")
        while len(self._partial) > _MAX_LINE:
            lines.append(self._partial[:_MAX_LINE])
            self._partial = self._partial[_MAX_LINE:]
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        stream = getattr(sys, self._stream, None)
        if not lines or stream is None:
            return
        prefix = f"[{self.description} {self.pid}] "
        text = "".join(f"{prefix}{line.decode(errors='replace')}\n" for line in lines)
        with contextlib.suppress(Exception):  # a closed or broken stream must not stop supervision
            stream.write(text)
            stream.flush()


class OutputChannel:
    """Supervisor side of a captured stdout pipe: whole lines, prefixed (``LinePrinter``)."""

    def __init__(self, fd: int, stream: str, description: str) -> None:
        self._fd = fd
        self.printer = LinePrinter(stream, description)

    @property
    def pid(self) -> int:
        return self.printer.pid

    @pid.setter
    def pid(self, pid: int) -> None:
        self.printer.pid = pid

    def fileno(self) -> int:
        return self._fd

    def pump(self, budget: int | None) -> bool:
        """Write out the whole lines read (up to ``budget`` reads); False at EOF."""
        if pump(self._fd, self.printer.write, budget):
            return True
        self.printer.close()  # the last line, even without its newline
        return False

    def close(self) -> None:
        self.printer.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
