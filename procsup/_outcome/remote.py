"""Outcomes across the process boundary: the one frame a task sends, and rebuilding its exception.

::

    child (procsup._process.entry)               result pipe               supervisor thread
    ──────────────────────────────               ───────────               ─────────────────
    task returns v   ─▶ encode_return(v) ──▶ [len:8][b"R"][pickle(v)] ──▶ FrameReader.feed(chunk)
    task raises e    ─▶ encode_error(e)  ──▶ [len:8][b"E"][pickle(ErrorReport)]     │ complete
                                                                                    ▼
                                           decode(body) -> Returned(v) | ErrorReport
                                           rebuild(report) -> e with its child-side traceback,
                                                              or a RemoteTraceback stand-in

A task sends exactly one frame, then exits. ``ErrorReport`` holds only ``str``/``bytes``, so it
always unpickles in the parent; the exception itself travels as a nested pickle made with tblib's
reducers (traceback, ``__cause__``, ``__context__``, ``__notes__``, ExceptionGroup members), so a
failure to rebuild it is contained and the formatted text is still there.

This is the only module that imports tblib (it is untyped).

Things that don't work
----------------------
- ``tblib.pickling_support.install()``: it rewires pickling of every exception class in the
  process, the user's included. A private ``Pickler.reducer_override`` does the same for our one
  pickle only.
- Only by reference for results and exceptions: a task that came by value (a lambda, a closure,
  the parent's ``__main__``: ``procsup._process.reduction``) returns and raises instances of
  classes that came with it, which have no importable name in the child. Pickling falls back on
  cloudpickle, so the parent gets its own class back (cloudpickle tracks classes it sent by
  value); under ``fork`` the same values go by reference, and the outcome is the same.
- Plain pickle for exceptions: it drops tracebacks and chains, and replays ``cls(*args)``, which
  fails in the parent for any class whose ``__init__`` takes other arguments than it passes up;
  tblib rebuilds those through ``__new__`` and their ``__dict__``.
- ``Connection.send()``/``recv()``: ``recv`` blocks until the whole message is in, so one 64 MiB
  result would stall the single supervisor thread for every other task. Frames are parsed
  incrementally from a non-blocking fd instead.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tblib import pickling_support

from procsup._outcome.errors import RemoteTraceback

__all__ = [
    "ErrorReport",
    "FrameReader",
    "Returned",
    "decode",
    "encode_error",
    "encode_return",
    "encode_value",
    "rebuild",
    "returned",
]

_HEADER = struct.Struct("!Q")
_RETURN = b"R"
_ERROR = b"E"


@dataclass(frozen=True)
class ErrorReport:
    """A task's exception, as the child saw it. Always decodable in the parent.

    Attributes:
        panicked: True for a ``BaseException`` that is not an ``Exception``.
        type_name: Qualified class name, "module.QualName" (bare for builtins).
        short_name: ``__qualname__`` of the class, for messages.
        message: ``str()`` of the exception.
        text: The full traceback as the child formats it, chain included.
        exception: The exception pickled with tblib's reducers, or None if it could not be.
    """

    panicked: bool
    type_name: str
    short_name: str
    message: str
    text: str
    exception: bytes | None


@dataclass(frozen=True)
class Returned:
    """A task's return value, unpickled in the parent."""

    value: Any


def _reduce_traceback(obj: Any) -> Any:
    if isinstance(obj, TracebackType):
        return pickling_support.pickle_traceback(obj)
    if isinstance(obj, BaseException):
        return pickling_support.pickle_exception(obj)
    return NotImplemented


class _TracebackPickler(pickle.Pickler):
    """Pickles exceptions with their traceback and chain (tblib), without touching copyreg."""

    def reducer_override(self, obj: Any) -> Any:
        return _reduce_traceback(obj)


@functools.cache
def _by_value_traceback_pickler() -> type[pickle.Pickler]:
    """``_TracebackPickler`` on cloudpickle: classes and functions that cannot be named by
    reference here (the user's ``__main__``, a local class) go by value."""
    import cloudpickle

    class ByValueTracebackPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            reduced = _reduce_traceback(obj)
            return super().reducer_override(obj) if reduced is NotImplemented else reduced

    return ByValueTracebackPickler


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload) + 1) + kind + payload


def encode_return(value: Any) -> bytes:
    """Return the frame carrying ``value``; raises whatever pickling ``value`` by reference
    raises if it cannot be pickled by value (cloudpickle) either."""
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - a __reduce__ may raise anything
        # Its class came by value (the parent's __main__, a REPL, a local class) and has no
        # importable name here: send it back the way it came, the parent knows it by
        # cloudpickle's tracker id. The fast path above never imports cloudpickle.
        import cloudpickle

        try:
            data = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - the by-reference error says more
            raise exc from None
    return _frame(_RETURN, data)


def encode_value(value: Any, what: str) -> bytes:
    """The frame of a ``what`` (``"task"``, ``"item"``) that returned ``value``: by reference,
    else by value (``encode_return``); if it cannot be sent at all, an error frame, a
    ``PicklingError`` saying so. Never raises."""
    try:
        return encode_return(value)
    except Exception as exc:  # noqa: BLE001 - pickling can raise anything a __reduce__ raises
        try:
            raise pickle.PicklingError(
                f"the {what}'s return value ({type(value).__qualname__}) cannot be sent to the "
                f"parent: {exc}"
            ) from exc
        except pickle.PicklingError as err:
            return encode_error(err)


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _dump_exception(exc: BaseException, pickler: type[pickle.Pickler]) -> bytes | None:
    buf = io.BytesIO()
    try:
        pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(exc)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - any failure to pickle means "try another way"
        return None


def _pickle_exception(exc: BaseException) -> bytes | None:
    # By reference first (no cloudpickle import on the common path), then by value: an exception
    # class from the parent's __main__ (it came by value with the task) or a local one.
    data = _dump_exception(exc, _TracebackPickler)
    if data is None:
        data = _dump_exception(exc, _by_value_traceback_pickler())
    if data is not None:
        return data
    # Perhaps only something in the chain is unpicklable: keep the exception and its traceback.
    saved = exc.__cause__, exc.__context__, exc.__suppress_context__
    exc.__cause__ = exc.__context__ = None
    try:
        return _dump_exception(exc, _by_value_traceback_pickler())
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = saved


def encode_error(exc: BaseException) -> bytes:
    """Return the frame reporting ``exc``. Never raises for any exception the task can raise."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        message = f"<unprintable {type(exc).__qualname__}>"
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001
        text = f"{_type_name(type(exc))}: {message}\n(the traceback could not be formatted)\n"
    report = ErrorReport(
        panicked=not isinstance(exc, Exception),
        type_name=_type_name(type(exc)),
        short_name=type(exc).__qualname__,
        message=message,
        text=text,
        exception=_pickle_exception(exc),
    )
    return _frame(_ERROR, pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL))


def _undecodable(what: str, exc: Exception) -> ErrorReport:
    return ErrorReport(
        panicked=False,
        type_name=_type_name(type(exc)),
        short_name=type(exc).__qualname__,
        message=f"{what} could not be unpickled in the parent: {exc}",
        text="".join(traceback.format_exception(exc)),
        exception=None,
    )


def returned(body: bytes | bytearray | memoryview) -> bool:
    """Whether a complete frame body reports a return (not an error), without decoding it."""
    return bytes(body[:1]) == _RETURN


def decode(body: bytes | bytearray | memoryview) -> Returned | ErrorReport:
    """Decode a complete frame body. Never raises: the supervisor thread must survive any frame.

    A return value that cannot be unpickled in the parent (its class is not importable here, its
    ``__setstate__`` raises...) or a malformed frame becomes an ``ErrorReport`` saying so.
    """
    kind, payload = bytes(body[:1]), memoryview(body)[1:]
    try:
        if kind == _RETURN:
            return Returned(pickle.loads(payload))
        if kind != _ERROR:
            raise ValueError(f"unknown frame kind {kind!r}")
        report = pickle.loads(payload)
        if not isinstance(report, ErrorReport):
            raise TypeError(f"malformed error report: {type(report).__name__}")
        return report
    except Exception as exc:  # noqa: BLE001 - whatever the user's __setstate__ raises
        what = "the task's return value" if kind == _RETURN else "the task's outcome frame"
        return _undecodable(what, exc)


def rebuild(report: ErrorReport) -> BaseException:
    """Return the child's exception with its child-side traceback and chain.

    Falls back to a :class:`RemoteTraceback` carrying the formatted text when the exception did not
    pickle in the child or does not unpickle here.
    """
    if report.exception is not None:
        try:
            exc = pickle.loads(report.exception)
        except Exception:  # noqa: BLE001 - e.g. the class exists only in the child
            pass
        else:
            if isinstance(exc, BaseException):
                return exc
    return RemoteTraceback(report.type_name, report.message, report.text)


class FrameReader:
    """Incremental parser of the single frame a task sends.

    Invariants: until the frame is whole, ``_buf`` holds every byte received; ``body`` is None
    until the whole frame is in, then views it until ``release()``; ``_done`` never goes back to
    False (bytes after the frame are ignored: nothing a task does after reporting can alter its
    outcome); ``received`` counts every byte, released or not.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: int | None = None
        self._received = 0
        self._done = False
        self.body: memoryview | None = None

    def feed(self, data: bytes) -> bool:
        """Add received bytes; return True once the frame is complete."""
        self._received += len(data)
        if self._done:
            return True
        self._buf += data
        if self._need is None and len(self._buf) >= _HEADER.size:
            (self._need,) = _HEADER.unpack_from(self._buf)
        if self._need is not None and len(self._buf) >= _HEADER.size + self._need:
            self.body = memoryview(self._buf)[_HEADER.size : _HEADER.size + self._need]
            self._done = True
            return True
        return False

    def release(self) -> None:
        """Free the buffer once the body is decoded (a 64 MiB result must not be kept twice)."""
        self.body = None
        self._buf = bytearray()

    @property
    def received(self) -> int:
        """Bytes received so far (for error messages about truncated frames)."""
        return self._received
