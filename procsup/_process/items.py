"""An executor's items on the wire: how a call travels to a worker, and how its outcome comes back.

::

    executor (procsup._executor)                         worker (procsup._process.worker)
    ────────────────────────────                         ────────────────────────────────
    submit(): dumps_call(fn, args, kwargs)
      pickle, by reference: the fast path
      cloudpickle, by value: when that fails or the
        pickle names __main__ (a lambda, a closure, a
        function typed at a REPL or in a script)
                       ◀── READY [kind, 0, node][frame]  after the initializer; then NODE
                       ◀── NODE [kind, 0, node][frame]   replies until it has named ``depth``
                                                          nodes: tokens its next items get
    ITEM [kind, id, length] call ────────────────────────▶ up to ``depth`` of them in the pipe;
                                                           taken in order, each under the next
                                                           named node: started = node.child_token()
                       ◀── SKIPPED [kind, id, node][frame]  the node was cancelled before the
                                                          start (taken back, or cancelled)
                       ◀── STARTED [kind, id, 0][frame]  or it runs now: if the worker dies
                                                          before DONE, this item killed it (in
                                                          one write with the DONE before it
                                                          when this item was in hand by then)
                       ◀── DONE [kind, id, node][frame]  frame: procsup._outcome.remote's, as a
                                                          task sends it (R value | E error)
    QUIT [kind, 0, 0] ───────────────────────────────────▶ after the items before it: return
                       ◀── INIT_FAILED [kind, 0, 0][an error frame]: then the worker returns

Every reply after the first names one more node (a ``(slot, live)`` of a token in the arena
both processes share: ``procsup._token.token.node``), so the executor always knows the token of
each item it sends before the item starts, and cancels it through ``borrow_node()``: a store to
shared memory that the item sees however busy the worker is.

A pipe each way, per worker. Frames to the worker are read with blocking reads by its one
thread; frames from it are parsed incrementally from a non-blocking fd by the executor's thread.
A reply's header (``REPLY``) ends with the outcome frame's own length word, so the executor
reads one struct and knows the length of what follows.

Things that don't work
----------------------
- cloudpickle for every call: measured here, ~4x the cost of plain pickle for a small call
  (3.2 against 0.8 us), and it pickles by value what plain pickle names by reference only for
  ``__main__``, local and unimportable objects anyway. Plain pickle first; its output names
  ``__main__`` only if something in the call lives there, which a worker under forkserver or
  spawn cannot look up (and under fork, can only for what existed when the worker forked).
- Passing tokens, Connections or multiprocessing locks in an item's args: they pickle only while
  a process is being started (``procsup._token.token``). The item's token is the worker's own,
  named to the executor by two integers; such objects can go to every worker through
  ``initargs``, which travel with the start.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable, Mapping
from typing import Any

from procsup._process.reduction import dumps_by_value as _by_value

__all__ = [
    "DONE",
    "INIT_FAILED",
    "ITEM",
    "NODE",
    "NO_FRAME",
    "PREFIX",
    "QUIT",
    "READY",
    "REPLY",
    "REQUEST",
    "SKIPPED",
    "STARTED",
    "describe",
    "dumps_call",
    "dumps_object",
]

REQUEST = struct.Struct("!BQQ")  # kind, item id, call length
PREFIX = struct.Struct("!BQII")  # a reply: kind, item id, the next token's node; then a frame
REPLY = struct.Struct("!BQIIQ")  # the prefix and the outcome frame's own length word
NO_FRAME = bytes(8)  # an outcome frame with nothing in it (READY)
ITEM, QUIT = 1, 2  # to the worker
READY, INIT_FAILED, DONE, SKIPPED, NODE, STARTED = 1, 2, 3, 4, 5, 6  # from the worker

_MAIN = b"__main__"


def _by_reference(obj: Any) -> bytes | None:
    """Plain pickle, or None when it fails or names ``__main__`` (then: by value)."""
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a __reduce__ may raise anything: try by value then
        return None
    return None if _MAIN in data else data


def describe(fn: object) -> str:
    """A short name for a callable in messages: its qualified name, ``partial(name)`` for a
    ``functools.partial``, else its type's name."""
    inner = getattr(fn, "func", None)
    if inner is not None and type(fn).__name__ == "partial":
        return f"partial({describe(inner)})"
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def dumps_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Pickle a call for a worker: by reference if it can, else by value (cloudpickle).

    Raises:
        TypeError: neither can pickle it; the message names the function, argument or keyword
            argument that failed, and why.
    """

    def refused(exc: Exception) -> TypeError:
        parts: list[tuple[str, object]] = [("its function", fn)]
        parts += [(f"argument {i}", arg) for i, arg in enumerate(args)]
        parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
        culprit, error = _culprit(parts, exc)
        return TypeError(
            f"procsup.Executor cannot send a call of {describe(fn)} to a worker process: "
            f"{culprit} cannot be pickled, by reference or by value (cloudpickle): {error}"
        )

    return _dumps((fn, args, dict(kwargs)), refused)


def dumps_object(obj: object, what: str) -> bytes:
    """Pickle one object (an initializer) as ``dumps_call`` pickles a call; ``what`` names it in
    the TypeError raised when it cannot be."""

    def refused(exc: Exception) -> TypeError:
        return TypeError(
            f"procsup.Executor cannot send {what} ({type(obj).__qualname__}) to its worker "
            f"processes: it cannot be pickled, by reference or by value (cloudpickle): {exc}"
        )

    return _dumps(obj, refused)


def _dumps(obj: object, refused: Callable[[Exception], TypeError]) -> bytes:
    data = _by_reference(obj)
    if data is not None:
        return data
    try:
        return _by_value(obj)
    except Exception as exc:
        raise refused(exc) from exc


def _culprit(parts: list[tuple[str, object]], error: Exception) -> tuple[str, Exception]:
    for name, obj in parts:
        try:
            _by_value(obj)
        except Exception as exc:  # noqa: BLE001
            return f"{name} ({type(obj).__qualname__})", exc
    return "the call", error  # each part alone pickles: together they do not (a cycle, say)
