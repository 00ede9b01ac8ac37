"""Importable task helpers for the newcomer tests (tests/test_newcomer.py).

What those tests send by value (lambdas, closures, ``__main__`` code) is made in the tests
themselves; this module holds what must be importable: the fast path's functions and classes, the
source of the ``__main__`` code, and the script every ``__main__`` flavour runs.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection
from typing import Any

from procsup import CancellationToken

DEADLINE = 30.0  # seconds; far beyond anything a passing test waits


def double(token: CancellationToken, x: int) -> int:
    return 2 * x


def apply(token: CancellationToken, fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` in the task: a callable that arrives as an argument."""
    return fn(*args)


def type_names(token: CancellationToken, *args: Any, **kwargs: Any) -> list[str]:
    """The types of what the task was given."""
    return [type(arg).__name__ for arg in (*args, *kwargs.values())]


def cloudpickle_imported(token: CancellationToken) -> bool:
    """Whether the task's process has imported cloudpickle (the fast path must not)."""
    return "cloudpickle" in sys.modules


def report_and_wait(token: CancellationToken, writer: Connection) -> bool:
    """Send a handshake, then wait for cancellation (bounded)."""
    writer.send("started")
    return token.wait(DEADLINE)


class Adder:
    """An importable class: its bound methods travel by reference."""

    def __init__(self, start: int) -> None:
        self.start = start

    def add(self, token: CancellationToken, n: int) -> int:
        return self.start + n


# Code as a newcomer types it into a REPL or a notebook: run in ``__main__``'s namespace by the
# ``main_code`` fixture, so its functions and classes are ``__main__``'s, with no file behind them.
MAIN_SOURCE = """
import dataclasses

@dataclasses.dataclass
class Point:
    x: int
    y: int

    def scaled(self, token, k):
        return Point(self.x * k, self.y * k)

class Oops(Exception):
    pass

def work(token, x):
    return 2 * x

def origin(token):
    return Point(1, 2)

def fail(token, message):
    raise Oops(message)

async def later(token, x):
    return x + 1
"""


# What a newcomer writes first, as one program run as a script, by ``python -c``, fed to a REPL
# (``python -i``) and to ``python -``, and cell by cell in a notebook's file-less ``__main__``.
# REPL-safe: no blank line inside a block, one after each top-level block. It starts every kind
# of callable under the start method in $NEWCOMER_START_METHOD, joins them, shuts its supervisor
# down and prints one line: NEWCOMER-RESULT {json}.
NEWCOMER_PROGRAM = """\
import dataclasses, functools, json, os, sys
import psutil
import procsup
from tests import newcomer_tasks

@dataclasses.dataclass
class Point:
    x: int
    y: int
    def scaled(self, token, k):
        return Point(self.x * k, self.y * k)

class Oops(Exception):
    pass

def work(token, x):
    return 2 * x

def fail(token, message):
    raise Oops(message)

def make_closure(k):
    def triple(token):
        return k * 3
    return triple

SETTINGS = {}

def setup_worker(point):
    SETTINGS["point"] = point  # a global of __main__, set in each executor worker

def item(x):
    return SETTINGS["point"].x * x

def main(defined_late):
    deadline = newcomer_tasks.DEADLINE
    fast = {"parent before": "cloudpickle" in sys.modules}
    sup = procsup.Supervisor(start_method=os.environ["NEWCOMER_START_METHOD"])
    probe = sup.spawn(newcomer_tasks.cloudpickle_imported, "fast path")
    fast["child"] = probe.join(deadline)
    fast["parent after"] = "cloudpickle" in sys.modules
    handles = {
        "function": sup.spawn(work, "function", args=(21,)),
        "lambda": sup.spawn(lambda token: 6 * 7, "lambda"),
        "closure": sup.spawn(make_closure(14), "closure"),
        "partial": sup.spawn(functools.partial(work, x=21), "partial"),
        "bound method": sup.spawn(Point(2, 3).scaled, "bound method", args=(7,)),
        "defined late": sup.spawn(defined_late, "defined late"),
    }
    results, same_class = {}, {}
    for name, handle in handles.items():
        value = handle.join(deadline)
        results[name] = repr(value)
        same_class[name] = type(value) is Point if isinstance(value, Point) else None
    failing = sup.spawn(fail, "fail", args=("boom",), parent_token=procsup.CancellationToken())
    try:
        failing.join(deadline)
    except procsup.TaskFailedError as exc:
        results["exception"] = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
        same_class["exception"] = type(exc.__cause__) is Oops
    method = os.environ["NEWCOMER_START_METHOD"]
    ex = procsup.Executor(2, start_method=method, initializer=setup_worker, initargs=(Point(2, 3),))
    items = [ex.submit(item, 21), ex.submit(lambda: item(7) * 3)]
    items.append(ex.submit(Point(6, 0).scaled, None, 7))
    results["executor"] = repr([future.result(deadline) for future in items])
    pids = sorted(p.pid for p in psutil.Process().children(recursive=True))
    ex.shutdown()
    sup.shutdown()
    out = {"fast": fast, "results": results, "same_class": same_class, "pids": pids}
    print("NEWCOMER-RESULT " + json.dumps(out), flush=True)

if __name__ == "__main__":
    def late(token):
        return "defined under the main guard"
    main(late)

"""

# What NEWCOMER_PROGRAM prints, whatever the start method and the flavour of ``__main__``.
NEWCOMER_EXPECTED = {
    "fast": {"parent before": False, "child": False, "parent after": False},
    "results": {
        "function": "42",
        "lambda": "42",
        "closure": "42",
        "partial": "42",
        "bound method": "Point(x=14, y=21)",
        "defined late": "'defined under the main guard'",
        "exception": "Oops: boom",
        "executor": "[42, 42, Point(x=42, y=0)]",
    },
    "same_class": {
        "function": None,
        "lambda": None,
        "closure": None,
        "partial": None,
        "bound method": True,
        "defined late": None,
        "exception": True,
    },
}

# A notebook: ipykernel runs each cell in a ``__main__`` module that has no file (no IPython
# here, so this is what one is, for procsup's purpose). Run as a script, with the cells in argv[1].
NOTEBOOK_RUNNER = """\
import sys, types
cells = sys.argv[1].split("\\n\\n")
notebook = types.ModuleType("__main__")
script = sys.modules["__main__"]
sys.modules["__main__"] = notebook
try:
    for number, cell in enumerate(cells, 1):
        code = compile(cell, f"<ipython-input-{number}-5e0d3c1a2b4f>", "exec")
        exec(code, notebook.__dict__)
finally:
    sys.modules["__main__"] = script
"""
