"""How a task's call crosses into its process: by reference where it can, by value where it must.

::

    launch (supervisor process)                         the task's process (zygote child, spawn)
    ───────────────────────────                         ────────────────────────────────────────
    by_value(task_fn, args, kwargs)  (a few attribute reads, before anything is pickled)
      False: the callable is a name in a module the  ─▶ ForkingPickler, as multiprocessing
             child can import (module-level function,   pickles; unpickling imports it (the
             class, builtin), and no argument is of     zygote has preloaded it)
             __main__ or local                                       │
      True: a lambda, a closure, anything of         ─▶ value_pickler(): cloudpickle, as loky ──┤
             ``__main__`` (a script, ``python -c``,      does; it still names by reference all  │
             a REPL, a notebook), a partial or a        that is importable, and tokens,        │
             bound method over one of them              Connections and other fds go through   │
                                                        the same ForkingPickler reducers       │
                                                        (``DupFd``)                            ▼
    either pickler fails ─▶ UnpicklableError ─▶ culprit(): each piece    load_payload(): plain
      pickled alone (tokens stubbed out) ─▶ TypeError naming it and      unpickling reads both
      the task                                                           (cloudpickle's helpers
                                                                         are named by reference)

Under ``fork`` nothing is pickled: the child is a copy and has everything already.

A class that reached a child by value is known there by cloudpickle's tracker id; a value of it
that goes back (a result, an exception) is rebuilt in the parent as an instance of the parent's
own class (``procsup._outcome.remote`` falls back on cloudpickle too).

Things that don't work
----------------------
- Every payload through cloudpickle: its ``reducer_override`` is a Python call for every object
  pickled. A trivial task's payload (``entry.main``, the ``Prepared`` task with its setup, pipes
  and token) was measured here at 33 us against 14 for ``ForkingPickler``, on the path of every
  start, where ``by_value()`` costs 0.5 us; and unpickling would import cloudpickle in every
  child (the zygote preloads it only once a by-value task comes).
- Pickling by reference first, then by value if the child could not import what the pickle
  names: pickling a token takes a reference that its child adopts (``procsup._token.token``), so
  a discarded first attempt would leak one. The choice is made before pickling, from the callable
  and the arguments (containers looked into up to ``_BUDGET`` items, then trusted): an instance
  of a ``__main__`` class deeper inside an argument of a module-level function is pickled by
  reference, and the task may fail to unpickle it (always under forkserver), as it would under
  multiprocessing. Wrapping the call in a lambda sends it all by value.
- ``__main__`` by reference under spawn, even when multiprocessing would re-run the script as
  ``__mp_main__`` in the child: a function defined under ``if __name__ == "__main__":`` is not
  there, and ``python - < script.py`` names a file ``<stdin>`` that the child cannot run.
- Importing ``__main__`` in the zygote: the zygote's ``__main__`` is its own, and importing the
  user's script by path would run it there. What comes from ``__main__`` comes by value.
- A trial pickle of ``task_fn`` before starting, to refuse it early: a closure or a partial can
  hold megabytes, which would be pickled twice. The one pickle of the start is the check;
  ``culprit`` runs only once it has failed.
"""

from __future__ import annotations

import functools
import io
import multiprocessing.context
import multiprocessing.reduction
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from procsup._process.messages import FdRef
from procsup._token.token import CancellationToken

__all__ = [
    "MAIN_MODULES",
    "UnpicklableError",
    "by_value",
    "culprit",
    "dumps_by_value",
    "home_module",
    "loads_sharing_main",
    "value_pickler",
]

# No child can import these by name: the zygote's ``__main__`` is its own, and ``__mp_main__``
# is what multiprocessing's spawn calls the user's ``__main__`` in a child it prepared.
MAIN_MODULES = frozenset({"__main__", "__mp_main__"})

# Items of container arguments looked at before trusting the rest (a list of a million ints must
# not cost a start a million checks; one of ``__main__`` dataclasses shows at its first item).
_BUDGET = 64

_ROUTINES = (types.FunctionType, types.BuiltinFunctionType)
_CONTAINERS = (tuple, list, set, frozenset)


class UnpicklableError(TypeError):
    """The task's call could not be pickled for its process; ``__cause__`` says why."""


def _named(obj: Any) -> bool:
    """True if pickle names ``obj`` (a function or class) by reference and a child finds it:
    it is the attribute its ``__qualname__`` says of a module other than ``__main__``."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if module is None or module in MAIN_MODULES or "<" in qualname:  # <lambda>, <locals>
        return False
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def _needs_value(obj: Any, budget: list[int]) -> bool:
    """True if pickling ``obj`` by reference would fail or name what a child cannot import."""
    kind = type(obj)
    if kind in _ROUTINES or isinstance(obj, type):
        if kind is types.BuiltinFunctionType and not isinstance(obj.__self__, types.ModuleType):
            return _needs_value(obj.__self__, budget)  # a bound builtin: pickled with its self
        return not _named(obj)
    if kind is types.MethodType:
        return _needs_value(obj.__func__, budget) or _needs_value(obj.__self__, budget)
    if kind is functools.partial:
        return (
            _needs_value(obj.func, budget)
            or _any_needs_value(obj.args, budget)
            or _any_needs_value(obj.keywords.values(), budget)
        )
    if kind in _CONTAINERS:
        return _any_needs_value(obj, budget)
    if kind is dict:
        return _any_needs_value(obj.values(), budget)
    # An instance: its class is named by reference (a local class, or one of __main__, is not).
    return kind.__module__ in MAIN_MODULES or "<" in kind.__qualname__


def _any_needs_value(items: Any, budget: list[int]) -> bool:
    for item in items:
        if budget[0] <= 0:
            return False
        budget[0] -= 1
        if _needs_value(item, budget):
            return True
    return False


def by_value(task_fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """True if the call ``task_fn(token, *args, **kwargs)`` must be pickled by value
    (``value_pickler()``) to reach a zygote child; False for the fast path, by reference."""
    budget = [_BUDGET]
    return (
        _needs_value(task_fn, budget)
        or _any_needs_value(args, budget)
        or _any_needs_value(kwargs.values(), budget)
    )


def home_module(task_fn: Callable[..., Any]) -> str | None:
    """The module the task's code lives in, for the zygote to preload; None for ``__main__``
    (the zygote must never import it) and for a callable that names none."""
    fn: Any = task_fn
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        else:
            break
    module = getattr(fn, "__module__", None)
    if not isinstance(fn, _ROUTINES) and not isinstance(fn, type):
        module = type(fn).__module__  # a callable instance: its class's module
    if not isinstance(module, str) or module in MAIN_MODULES or module not in sys.modules:
        return None
    return module


@functools.cache
def _value_pickler_class() -> type[pickle.Pickler]:
    import cloudpickle

    class ValuePickler(cloudpickle.Pickler):  # type: ignore[misc]
        """cloudpickle, with multiprocessing's reducers first: a Connection, a socket, a token's
        arena still cross as ``DupFd`` (an ``FdRef``), exactly as with ``ForkingPickler``."""

        dispatch_table: ClassVar[ChainMap[type, Any]] = ChainMap(
            multiprocessing.reduction.ForkingPickler._extra_reducers,  # type: ignore[attr-defined]
            cloudpickle.Pickler.dispatch_table,
        )

    return ValuePickler


def _register_mp_main() -> None:
    main = sys.modules.get("__mp_main__")
    if main is not None and main.__name__ == "__mp_main__":
        # We are a spawn child: the user's script is ``__mp_main__`` here, which cloudpickle
        # would name by reference, and a forkserver grandchild cannot import.
        import cloudpickle

        if main.__name__ not in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.register_pickle_by_value(main)


def value_pickler() -> type[pickle.Pickler]:
    """The pickler for calls that go by value into a process being started (imports
    cloudpickle on first use); fds cross as ``DupFd``."""
    _register_mp_main()
    return _value_pickler_class()


def dumps_by_value(obj: Any) -> bytes:
    """``obj`` pickled by value as ``value_pickler()`` pickles it, for a pipe to a process that
    is already running (an executor's worker, a Ray node's task): no fd can cross there, so
    multiprocessing's reducers are left out, and a token refuses to be pickled."""
    _register_mp_main()
    import cloudpickle

    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


class _Collector:
    """A stand-in "spawning popen" for ``culprit``: fds are numbered, never passed anywhere."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    DupFd = FdRef


def _stub_token(token: CancellationToken) -> tuple[Any, ...]:
    # Pickling a real token takes a reference for the child; a probe must take none.
    return (int, (0,))


@functools.cache
def _value_probe_class() -> type[pickle.Pickler]:
    # A class attribute: the C pickler reads ``dispatch_table`` once, when it is made, and an
    # instance attribute would shadow cloudpickle's class-level table without reaching it.
    base: Any = value_pickler()

    class ValueProbe(base):  # type: ignore[misc]
        dispatch_table: ClassVar[ChainMap[type, Any]] = ChainMap(
            {CancellationToken: _stub_token}, base.dispatch_table
        )

    return ValueProbe


def _probe(obj: Any, value: bool) -> Exception | None:
    """Pickle ``obj`` alone as a start would; the exception it raises, or None."""
    pickler: pickle.Pickler
    if value:
        pickler = _value_probe_class()(io.BytesIO(), pickle.HIGHEST_PROTOCOL)
    else:
        pickler = multiprocessing.reduction.ForkingPickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table[CancellationToken] = _stub_token  # its own copy, made per pickler
    multiprocessing.context.set_spawning_popen(_Collector())  # type: ignore[arg-type]
    try:
        pickler.dump(obj)
    except Exception as exc:  # noqa: BLE001 - whatever a __reduce__ raises is the answer
        return exc
    finally:
        multiprocessing.context.set_spawning_popen(None)
    return None


def culprit(
    task_fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], value: bool
) -> tuple[str, Exception, bool] | None:
    """Which piece of a call that failed to pickle fails alone, or None if none does:
    ``("args[1], <its repr>,", its error, whether it would pickle by value)``. Side-effect free:
    tokens are stubbed out, fds only numbered."""
    pieces: list[tuple[str, Any]] = [("its function", task_fn)]
    pieces += [(f"args[{i}]", arg) for i, arg in enumerate(args)]
    pieces += [(f"kwargs[{name!r}]", arg) for name, arg in kwargs.items()]
    for where, piece in pieces:
        error = _probe(piece, value)
        if error is not None:
            fixable = not value and _probe(piece, True) is None
            return f"{where}, {_short_repr(piece)},", error, fixable
    return None


def _short_repr(obj: Any, limit: int = 120) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= limit else f"{text[: limit - 4]} ...{text[-1]}"


# This process's one namespace for each ``__main__`` that functions came from by value (an
# executor worker's): ``loads_sharing_main``.
_MAIN_GLOBALS: dict[str, dict[str, Any]] = {}


def _make_function(code: Any, base: dict[str, Any], *rest: Any) -> Any:
    import cloudpickle.cloudpickle as cp

    name = base.get("__name__")
    if name in MAIN_MODULES:
        shared = _MAIN_GLOBALS.setdefault(name, {})
        for key, value in base.items():
            shared.setdefault(key, value)
        base = shared
    return cp._make_function(code, base, *rest)


def _function_setstate(obj: Any, state: tuple[dict[str, Any], dict[str, Any]]) -> None:
    import cloudpickle.cloudpickle as cp

    if any(obj.__globals__ is shared for shared in _MAIN_GLOBALS.values()):
        # What this process's __main__ already holds wins over the sender's copy of it: a global
        # the initializer set stays set, as in a module that lives on in a pool's worker.
        inner, slots = state
        sent = slots["__globals__"]
        keep = {key: value for key, value in sent.items() if key not in obj.__globals__}
        state = (inner, {**slots, "__globals__": keep})
    cp._function_setstate(obj, state)


class _SharingUnpickler(pickle.Unpickler):
    _HOOKS: ClassVar[dict[tuple[str, str], Any]] = {
        ("cloudpickle.cloudpickle", "_make_function"): _make_function,
        ("cloudpickle.cloudpickle", "_function_setstate"): _function_setstate,
    }

    def find_class(self, module: str, name: str) -> Any:
        hook = self._HOOKS.get((module, name))
        return hook if hook is not None else super().find_class(module, name)


def loads_sharing_main(data: bytes) -> Any:
    """Unpickle what a long-lived process (an executor's worker) receives again and again: a
    function that came by value from ``__main__`` (``dumps_by_value``) gets this process's one
    copy of ``__main__``'s globals, not a fresh one per pickle as cloudpickle alone would give,
    so what an initializer sets there, items see. Globals this process already has keep their
    values; the sender's copies fill in only what is missing. Plain ``pickle.loads`` otherwise.
    """
    if b"_make_function" not in data:
        return pickle.loads(data)
    return _SharingUnpickler(io.BytesIO(data)).load()
