"""Code a newcomer writes first runs under every start method (issue 13, part A).

Task functions defined in ``__main__`` (a script, ``python -c``, a REPL, ``python -``, a
notebook), lambdas, closures, ``functools.partial`` objects and bound methods run and return their
value: by reference where the child can import them (the fast path), by value (cloudpickle)
where it cannot. Tokens and pipes in the call still cross as before. What cannot be pickled at all
raises ``TypeError`` at ``spawn()``, naming the task and the offending object, and starts nothing.

The ``__main__`` flavours run as subprocesses, each with a deadline; each shuts its supervisor
down, and the test checks that every process it had is gone.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import CancellationToken, Supervisor, TaskFailedError
from procsup._process.reduction import by_value, culprit, home_module
from procsup._token.arena import _REFS, SLOT_WORDS
from tests import newcomer_tasks
from tests.conftest import helper_pids, process_gone
from tests.newcomer_tasks import DEADLINE, NEWCOMER_EXPECTED, NEWCOMER_PROGRAM, NOTEBOOK_RUNNER

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DEADLINE = 50.0  # seconds for a whole subprocess (pytest's own timeout is 60)

Pipe = Callable[[], tuple[Connection, Connection]]


@pytest.fixture
def main_code() -> Iterator[dict[str, Any]]:
    """``MAIN_SOURCE`` run in ``__main__``'s own namespace, as a REPL or a notebook would: its
    functions and classes are ``__main__``'s, with no file behind them. Removed afterwards."""
    main = sys.modules["__main__"]
    before = set(vars(main))
    exec(newcomer_tasks.MAIN_SOURCE, vars(main))
    yield {name: value for name, value in vars(main).items() if name not in before}
    for name in set(vars(main)) - before:
        delattr(main, name)


def _closure(k: int) -> Callable[[CancellationToken], int]:
    def triple(token: CancellationToken) -> int:
        return 3 * k

    return triple


def _async_closure(k: int) -> Callable[[CancellationToken], Any]:
    async def later(token: CancellationToken) -> int:
        return k + 1

    return later


class _Multiplier:
    def __init__(self, k: int) -> None:
        self.k = k

    def times(self, token: CancellationToken, n: int) -> int:
        return self.k * n


def _local_multiplier(k: int) -> Any:
    class Multiplier(_Multiplier):  # a local class: it goes by value, with its methods
        pass

    return Multiplier(k)


Call = tuple[Callable[..., Any], tuple[Any, ...], Any]  # task_fn, args, what it returns

# Each kind of callable a newcomer passes, made from the ``main_code`` namespace.
CALLABLES: dict[str, Callable[[dict[str, Any]], Call]] = {
    "module function (by reference)": lambda main: (newcomer_tasks.double, (21,), 42),
    "__main__ function": lambda main: (main["work"], (21,), 42),
    "__main__ async function": lambda main: (main["later"], (41,), 42),
    "lambda": lambda main: (lambda token, x: x * 2, (21,), 42),
    "closure": lambda main: (_closure(14), (), 42),
    "async closure": lambda main: (_async_closure(41), (), 42),
    "partial of a module function": lambda main: (
        functools.partial(newcomer_tasks.double, x=21),
        (),
        42,
    ),
    "partial of a lambda": lambda main: (functools.partial(lambda t, a, b: a * b, b=6), (7,), 42),
    "partial of a __main__ function": lambda main: (functools.partial(main["work"]), (21,), 42),
    "bound method (importable class)": lambda main: (newcomer_tasks.Adder(40).add, (2,), 42),
    "bound method of a __main__ class": lambda main: (
        main["Point"](2, 3).scaled,
        (7,),
        main["Point"](14, 21),
    ),
    "bound method of a local class": lambda main: (_local_multiplier(6).times, (7,), 42),
    "callable as an argument": lambda main: (newcomer_tasks.apply, (lambda a: a + 1, 41), 42),
}


@pytest.mark.parametrize("kind", CALLABLES)
def test_callables_run_and_return(
    runtime: Supervisor, main_code: dict[str, Any], kind: str
) -> None:
    """Test that each kind of callable runs under every start method and returns its value."""
    task_fn, args, expected = CALLABLES[kind](main_code)
    assert runtime.spawn(task_fn, kind, args=args).join(DEADLINE) == expected


def test_main_classes_come_back_as_themselves(
    runtime: Supervisor, main_code: dict[str, Any]
) -> None:
    """Test that a result and an exception of ``__main__`` classes that went by value come back
    as instances of the parent's own classes, not lookalikes."""
    point, oops = main_code["Point"], main_code["Oops"]
    value = runtime.spawn(main_code["origin"], "origin").join(DEADLINE)
    assert type(value) is point
    assert value == point(1, 2)
    handle = runtime.spawn(
        main_code["fail"], "fail", args=("boom",), parent_token=CancellationToken()
    )
    with pytest.raises(TaskFailedError, match=r"failed: Oops: boom") as info:
        handle.join(DEADLINE)
    cause = info.value.__cause__
    assert type(cause) is oops
    assert cause is not None
    assert cause.__traceback__ is not None  # the child's frames, rebuilt


def test_local_classes_come_back_by_value(runtime: Supervisor) -> None:
    """Test that a lambda may return what cannot be named by reference (a local class, another
    lambda): it comes back by value instead of failing; as the parent's own class if the class
    went to the child by value (under fork nothing went: a copy of the class comes back)."""

    class Local:
        def __init__(self, x: int) -> None:
            self.x = x

    def answer() -> int:
        return 42

    value = runtime.spawn(lambda token: (Local(41), answer), "local").join(DEADLINE)
    instance, fn = value
    assert type(instance).__name__ == "Local"
    assert (type(instance) is Local) == (runtime.start_method != "fork")
    assert instance.x == 41
    assert fn() == 42


def test_tokens_and_pipes_cross_by_value(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that a closure holding a token and a pipe, and a lambda given a token in args, reach
    the task as they do by reference: the same token node, the same pipe."""
    reader, writer = pipe()
    captured, passed = CancellationToken(), CancellationToken()

    def task(token: CancellationToken) -> int:  # a closure: it goes by value
        writer.send("hello from the closure")
        captured.cancel("cancelled in the task")
        return os.getpid()

    handle = runtime.spawn(task, "closure with a token and a pipe")
    writer.close()
    assert reader.poll(DEADLINE)
    assert reader.recv() == "hello from the closure"
    assert handle.join(DEADLINE) == handle.pid
    assert captured.cause == "cancelled in the task"
    other = runtime.spawn(
        lambda token, other: other.cancel("through args") or other.is_cancelled(),
        "lambda with a token in args",
        args=(passed,),
    )
    assert other.join(DEADLINE) is True
    assert passed.cause == "through args"


def test_a_lambda_task_is_cancelled_like_any_other(runtime: Supervisor, pipe: Pipe) -> None:
    """Test that a by-value task gets its own token: cancelling the handle reaches it."""
    reader, writer = pipe()
    handle = runtime.spawn(
        lambda token, w: newcomer_tasks.report_and_wait(token, w), "waits", args=(writer,)
    )
    writer.close()
    assert reader.poll(DEADLINE)
    handle.cancel()
    assert handle.join(DEADLINE) is True


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)} - helper_pids()


def test_unpicklable_args_raise_naming_them(runtime: Supervisor) -> None:
    """Test that an argument that cannot be pickled raises TypeError at spawn(), naming the task
    and the argument, by reference and by value alike, and starts nothing (under fork nothing
    is pickled: the task runs)."""
    lock = threading.Lock()
    cases: list[tuple[Callable[..., Any], dict[str, Any], str]] = [
        (newcomer_tasks.type_names, {"args": (1, lock)}, r"args\[1\], <unlocked _thread\.lock obj"),
        (lambda token, x: [type(x).__name__], {"args": (lock,)}, r"args\[0\], <unlocked _thread"),
        (newcomer_tasks.type_names, {"kwargs": {"x": lock}}, r"kwargs\['x'\], <unlocked _thread"),
    ]
    for task_fn, call, named in cases:
        if runtime.start_method == "fork":  # nothing is pickled: the child has the lock
            assert "lock" in runtime.spawn(task_fn, "bad args", **call).join(DEADLINE)
            continue
        before = _children()
        with pytest.raises(TypeError) as info:
            runtime.spawn(task_fn, "bad args", **call)
        message = str(info.value)
        assert message.startswith("critical task 'bad args' could not be started: ")
        assert f"under the {runtime.start_method!r} start method" in message
        assert "cannot pickle '_thread.lock' object" in message
        assert re.search(named, message), message
        assert _children() <= before
    assert runtime.spawn(newcomer_tasks.double, "still usable", args=(21,)).join(DEADLINE) == 42


def test_a_lambda_deep_in_an_argument_gets_advice(runtime: Supervisor) -> None:
    """Test that a lambda beyond what ``by_value()`` looks into fails by reference with advice
    that works: passing the call as a lambda sends it all by value."""
    data = [0] * 64 + [lambda: 1]  # past the items looked into: the fast path is chosen
    if runtime.start_method != "fork":
        with pytest.raises(TypeError) as info:
            runtime.spawn(newcomer_tasks.type_names, "deep", args=(data,))
        message = str(info.value)
        assert message.startswith("critical task 'deep' could not be started: args[0], [0, 0,")
        assert "it would pickle by value: pass the call as a lambda or closure" in message
    handle = runtime.spawn(lambda token: newcomer_tasks.type_names(token, *data), "advised")
    assert handle.join(DEADLINE) == ["int"] * 64 + ["function"]


def test_unpicklable_callable_raises_naming_it(runtime: Supervisor) -> None:
    """Test that a callable that cannot be pickled even by value (a closure over a lock) raises
    TypeError at spawn() naming the task and the callable, and starts nothing."""
    lock = threading.Lock()

    def holds_a_lock(token: CancellationToken) -> bool:
        return lock.locked()

    if runtime.start_method == "fork":
        assert runtime.spawn(holds_a_lock, "locked").join(DEADLINE) is False
        return
    before = _children()
    with pytest.raises(TypeError) as info:
        runtime.spawn(holds_a_lock, "locked")
    message = str(info.value)
    assert message.startswith("critical task 'locked' could not be started: its function, ")
    assert "holds_a_lock" in message
    assert "cannot be pickled, not even by value (cloudpickle), under the" in message
    assert "cannot pickle '_thread.lock' object" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert _children() <= before


# ---------------------------------------------------------------- the choice, without processes


def test_the_fast_path_is_chosen_by_reference(main_code: dict[str, Any]) -> None:
    """Test which calls go by value: only those whose callable or arguments a child could not
    import by name (lambdas, closures, __main__, local classes), however they are wrapped."""
    point = main_code["Point"]
    by_reference: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
        (newcomer_tasks.double, (21,), {}),
        (newcomer_tasks.double, (), {"x": 21}),
        (functools.partial(newcomer_tasks.double, x=21), (), {}),
        (newcomer_tasks.Adder(1).add, (2,), {}),
        (newcomer_tasks.apply, (newcomer_tasks.double, CancellationToken(), 2), {}),
        (newcomer_tasks.apply, (print, [1, 2, 3], {"a": (1,)}), {}),
        (newcomer_tasks.apply, (list(range(100_000)),), {}),  # looked into only so far
        (newcomer_tasks.Adder, (), {}),
    ]
    for task_fn, args, kwargs in by_reference:
        assert not by_value(task_fn, args, kwargs), (task_fn, args, kwargs)
    value: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
        (lambda token: None, (), {}),
        (_closure(1), (), {}),
        (main_code["work"], (1,), {}),
        (point(1, 2).scaled, (2,), {}),
        (point, (1, 2), {}),
        (functools.partial(main_code["work"]), (1,), {}),
        (functools.partial(newcomer_tasks.type_names, fn=lambda: 1), (), {}),
        (newcomer_tasks.apply, (lambda: 1,), {}),
        (newcomer_tasks.apply, (len, [point(1, 2)]), {}),
        (newcomer_tasks.apply, (len,), {"data": {"p": point(1, 2)}}),
        (newcomer_tasks.apply, (_local_multiplier(1),), {}),  # a local class's instance
    ]
    for task_fn, args, kwargs in value:
        assert by_value(task_fn, args, kwargs), (task_fn, args, kwargs)


def test_home_module_never_names_main(main_code: dict[str, Any]) -> None:
    """Test that the zygote is asked to preload the task's own module, never ``__main__``."""
    assert home_module(newcomer_tasks.double) == "tests.newcomer_tasks"
    assert home_module(functools.partial(newcomer_tasks.double, x=1)) == "tests.newcomer_tasks"
    assert home_module(newcomer_tasks.Adder(1).add) == "tests.newcomer_tasks"
    assert home_module(lambda token: None) == __name__
    assert home_module(main_code["work"]) is None
    assert home_module(functools.partial(main_code["work"])) is None
    assert home_module(main_code["Point"](1, 2).scaled) is None


def test_culprit_takes_no_token_reference() -> None:
    """Test that looking for the piece that fails pickles tokens without taking a reference
    (it is only a probe), and finds the piece: a lock anywhere, a lambda by reference only."""
    token = CancellationToken()
    refs = token._arena.words[token._slot * SLOT_WORDS + _REFS]
    for value in (False, True):
        found = culprit(newcomer_tasks.apply, (token,), {"lock": threading.Lock()}, value=value)
        assert found is not None
        where, error, fixable = found
        assert where.startswith("kwargs['lock'], <unlocked _thread.lock object")
        assert "cannot pickle '_thread.lock' object" in str(error)
        assert not fixable
    assert culprit(newcomer_tasks.apply, (token, lambda: 1), {}, value=True) is None
    found = culprit(newcomer_tasks.apply, (token, lambda: 1), {}, value=False)
    assert found is not None
    assert found[0].startswith("args[1], <function test_culprit_takes_no_token_reference.")
    assert found[2]  # it would pickle by value
    assert token._arena.words[token._slot * SLOT_WORDS + _REFS] == refs


# ---------------------------------------------------------------- __main__ in a real process


def _run(argv: list[str], method: str, tmp_path: Path, stdin: str | None = None) -> dict[str, Any]:
    """Run a newcomer program to its end; return what it printed on its result line, once every
    process it had is gone."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "NEWCOMER_START_METHOD": method,
    }
    proc = subprocess.run(
        [sys.executable, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=SCRIPT_DEADLINE,
        cwd=tmp_path,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if "NEWCOMER-RESULT " in line]
    assert proc.returncode == 0, proc.stderr
    assert len(lines) == 1, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    result: dict[str, Any] = json.loads(lines[0].split("NEWCOMER-RESULT ", 1)[1])
    for pid in result.pop("pids"):  # its zygote, spare and shims: gone with the supervisor
        assert process_gone(pid, DEADLINE), f"pid {pid} outlived its supervisor"
    return result


def _script(tmp_path: Path) -> list[str]:
    (tmp_path / "newcomer.py").write_text(NEWCOMER_PROGRAM)
    return ["newcomer.py"]


FLAVOURS: dict[str, Callable[[Path], tuple[list[str], str | None]]] = {
    "script": lambda tmp: (_script(tmp), None),
    "python -c": lambda tmp: (["-c", NEWCOMER_PROGRAM], None),
    "REPL (python -i)": lambda tmp: (["-q", "-i"], NEWCOMER_PROGRAM),
    "python - (stdin)": lambda tmp: (["-"], NEWCOMER_PROGRAM),
    "notebook": lambda tmp: (["-c", NOTEBOOK_RUNNER, NEWCOMER_PROGRAM], None),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_main_flavours(start_method: str, flavour: str, tmp_path: Path) -> None:
    """Test that a program defining its tasks in ``__main__`` (script, ``-c``, REPL, stdin,
    notebook) runs them all under every start method: functions, a lambda, a closure, a
    partial, a bound method, a function defined under the main guard; results and exceptions
    of its own classes come back as those classes, and a module-level task takes the fast path
    (no cloudpickle on either side); and an Executor whose initializer sets a global of
    ``__main__`` from ``initargs`` of a ``__main__`` class runs items that read it."""
    argv, stdin = FLAVOURS[flavour](tmp_path)
    assert _run(argv, start_method, tmp_path, stdin) == NEWCOMER_EXPECTED
