"""Where a start's time goes: timestamps along the path of one trivial task, start to result.

    python scripts/start_path.py                      # default start method, 300 runs
    python scripts/start_path.py --method fork --runs 200
    python scripts/start_path.py --crash              # the task SIGKILLs itself: until the
                                                      # parent token's waiter wakes
    python scripts/start_path.py --detail             # the task's own steps too

Not part of the library, and nothing of it runs unless this script runs: it wraps procsup's
private functions with probes, in this process and, as a ``preload`` module, in the zygote (whose
spares and tasks inherit them). A probe writes one line (pid, ``time.perf_counter_ns()``: one
clock, CLOCK_MONOTONIC, for every process, and the process's page faults so far) to a file opened
with O_APPEND, so the marks of all processes interleave in time order. A mark costs a few us (two
system calls), so the probed total is a little above the bench's.

Each run is one ``spawn()`` + ``join()`` of ``trivial`` (or one crash), one after the other, as
the bench's rows are. For every mark the script prints its median offset from ``spawn()`` over
the runs, the median step from the mark before it, and the median page faults of its process
since that process's previous mark (the first write to a page after a fork copies it).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_ENV = "PROCSUP_START_PATH_LOG"
_DETAIL = "PROCSUP_START_PATH_DETAIL"
_fd = -1


def mark(name: str) -> None:
    """Record ``name`` now, in whatever process this runs."""
    global _fd
    path = os.environ.get(_ENV)
    if not path:
        return
    now = time.perf_counter_ns()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    line = f"{os.getpid()} {now} {faults} {name}\n".encode()
    for _ in range(2):
        if _fd < 0:
            _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(_fd, line)
            return
        except OSError:  # closed by a child's fd cleanup: open our own
            _fd = -1


def trivial(token: object) -> int:
    mark("task: its function runs")
    return 1


def crash(token: object) -> None:
    mark("task: SIGKILLs itself")
    os.kill(os.getpid(), signal.SIGKILL)


def idle(token: Any) -> None:
    token.wait()


# ---------------------------------------------------------------- probes

# (module, attribute, mark on entry, mark on return): a missing one is skipped, so the script
# probes whatever the tree has (the path moves between versions).
_PROBES: list[tuple[str, str, str | None, str | None]] = [
    ("procsup._supervision.local", "launch", "supervisor: validated, launch()", None),
    ("procsup._process.zygote", "ZygoteProcess.start", "supervisor: pipes made, pickling", None),
    ("procsup._process.zygote", "ForkProcess.start", "supervisor: pipes made, forking", None),
    ("procsup._process.zygote", "send_fds", "supervisor: request sent", None),
    ("procsup._process.zygote", "_Zygote._call", None, "supervisor: reply received"),
    ("procsup._supervision.monitor", "Monitor.add", None, "supervisor: watched"),
    ("procsup._supervision.supervisor", "Supervisor.spawn", None, "supervisor: spawn() returns"),
    ("procsup._process.server", "_Server.reply", None, "zygote: replied"),
    ("procsup._process.server", "_Server.forward", None, "zygote: forwarded to the spare"),
    ("procsup._process.server", "_Server.fork_task", "zygote: no spare, forks the task", None),
    ("procsup._process.server", "_Server.fork_spare", "zygote: forks a spare", "zygote: done"),
    ("procsup._process.server", "_spare_main", "spare: forked", None),
    ("procsup._process.server", "warm", None, "spare: warmed up, idle"),
    ("procsup._process.server", "_become_task", "task: request unpickled", None),
    ("procsup._process.server", "load_payload", None, "task: payload unpickled"),
    ("procsup._process.shim", "serve", "shim: runs", None),
    ("procsup._process.entry", "write_all", None, "task: result written"),
    ("procsup._supervision.monitor", "Monitor._decode", "monitor: result frame whole", None),
    ("procsup._supervision.monitor", "Monitor._finish", "monitor: exit seen", "monitor: cancelled"),
    ("procsup._supervision.monitor", "Monitor._publish", None, "monitor: done"),
]
_DETAILS = [
    ("procsup._process.entry", name, None, f"task: {name}() done")
    for name in ("_reset_signals", "detach_process_group", "enter_task", "attach")
] + [
    ("procsup._process.setup", "install_forwarder", None, "task: install_forwarder() done"),
    ("procsup._outcome.crash", "crashed", "monitor: builds the crash error", None),
    ("procsup._token.token", "CancellationToken.cancel", "monitor: cancel() called", None),
]


def _wrap(owner: Any, attr: str, on_entry: str | None, on_return: str | None) -> None:
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_probed", False):
        return

    @functools.wraps(fn)
    def probed(*args: Any, **kwargs: Any) -> Any:
        if on_entry:
            mark(on_entry)
        try:
            return fn(*args, **kwargs)
        finally:
            if on_return:
                mark(on_return)

    probed._probed = True  # type: ignore[attr-defined]
    setattr(owner, attr, probed)


def _wrap_returning(owner: Any, attr: str, name: Callable[[Any], str | None]) -> None:
    """Mark ``name(result)`` (None: nothing) when ``owner.attr`` returns."""
    fn = getattr(owner, attr, None)
    if fn is None or getattr(fn, "_probed", False):
        return

    @functools.wraps(fn)
    def probed(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        text = name(result)
        if text:
            mark(text)
        return result

    probed._probed = True  # type: ignore[attr-defined]
    setattr(owner, attr, probed)


def install() -> None:
    """Wrap whatever of the start path this tree has, in this process."""
    probes = _PROBES + (_DETAILS if os.environ.get(_DETAIL) else [])
    for module_name, path, on_entry, on_return in probes:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *outer, attr = path.split(".")
        for name in outer:
            owner = getattr(owner, name, None)
        if owner is not None:
            _wrap(owner, attr, on_entry, on_return)
    server = importlib.import_module("procsup._process.server")
    zygote = os.getpid() if sys.argv[:1] == ["-c"] else 0  # the zygote runs ``python -c``

    def received(result: tuple[bytes, list[int]]) -> str | None:
        if os.getpid() == zygote:
            return "zygote: request received" if result[0] else None
        return "spare: wakes with the request"

    _wrap_returning(server, "recv_fds", received)
    guardian = importlib.import_module("procsup._process.guardian").Guardian
    _wrap_returning(guardian, "reap", lambda n: "zygote: reaped, status written" if n else None)


if os.environ.get(_ENV):  # imported as a preload module by the zygote, or by the script below
    install()


# ---------------------------------------------------------------- the script


def _raw_fork() -> float:
    """Microseconds of an ``os.fork()`` + ``waitpid`` of this process, its child exiting at once."""
    start = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter_ns() - start) / 1e3


def _raw_crash() -> float:
    """Microseconds from a child's SIGKILL of itself until waitpid returns here."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(writer, time.perf_counter_ns().to_bytes(8, "little"))
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    woke = time.perf_counter_ns()
    sent = int.from_bytes(os.read(reader, 8), "little")
    os.close(reader)
    os.close(writer)
    return (woke - sent) / 1e3


Run = list[tuple[int, str, int]]  # (ns, mark, page faults since its process's mark before, or -1)


def _runs(lines: list[str], first: str) -> list[Run]:
    """The marks of each run (from a ``first`` mark to the next), in time order."""
    events: list[tuple[int, str, int, int]] = []
    for line in lines:
        pid, ns, faults, name = line.rstrip("\n").split(" ", 3)
        events.append((int(ns), name, int(pid), int(faults)))
    events.sort()
    runs: list[Run] = []
    last: dict[int, int] = {}
    for at, what, process, count in events:
        if what == first:
            runs.append([])
            last = {}
        if runs:
            runs[-1].append((at, what, count - last[process] if process in last else -1))
            last[process] = count
    return runs


def _report(runs: list[Run]) -> None:
    offsets: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    for run in runs:
        start = run[0][0]
        seen = set()
        for ns, name, fault in run:
            if name in seen:  # a mark made twice in a run: its first time
                continue
            seen.add(name)
            offsets.setdefault(name, []).append((ns - start) / 1e3)
            if fault >= 0:
                faults.setdefault(name, []).append(fault)
    print(f"  {'mark':<44} {'at':>8} {'step':>8} {'faults':>7} {'runs':>5}")
    previous = 0.0
    for name in sorted(offsets, key=lambda n: statistics.median(offsets[n])):
        at = statistics.median(offsets[name])
        copied = f"{statistics.median(faults[name]):7.0f}" if name in faults else " " * 7
        print(f"  {name:<44} {at:8.0f} {at - previous:8.0f} {copied} {len(offsets[name]):5d}")
        previous = at


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="forkserver", choices=["forkserver", "fork"])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--crash", action="store_true", help="the task SIGKILLs itself")
    parser.add_argument("--detail", action="store_true", help="the task's own steps too")
    parser.add_argument("--crowd", type=int, default=0, help="idle tasks alive meanwhile")
    args = parser.parse_args(argv)
    # Apart, and first: a fork here would leave every page of ours to copy in the runs below.
    raw = [_raw_crash() if args.crash else _raw_fork() for _ in range(args.runs)]
    log = f"/tmp/procsup-start-path-{os.getpid()}.log"
    os.environ[_ENV] = log
    if args.detail or args.crash:
        os.environ[_DETAIL] = "1"
    install()
    import procsup

    logging.getLogger("procsup").setLevel(logging.CRITICAL)
    here = importlib.import_module("start_path")  # by reference: the zygote imports it
    task = here.crash if args.crash else here.trivial
    total = []
    with procsup.Supervisor(start_method=args.method, preload=["start_path"]) as sup:
        for _ in range(20):  # warm-up: the zygote, its imports, the spare
            sup.spawn(here.trivial, "warm-up").join(10)
        crowd = [sup.spawn(here.idle, f"idle {i}") for i in range(args.crowd)]
        os.truncate(log, 0)
        for _ in range(args.runs):
            time.sleep(0.01)  # the spare forked and ready, as between the bench's default rows
            start = time.perf_counter()
            mark("supervisor: spawn() called")
            if args.crash:
                parent = procsup.CancellationToken()
                handle = sup.spawn(task, "t", parent_token=parent)
                parent.wait(10)
                mark("supervisor: the parent token's waiter wakes")
                handle.detach()
            else:
                sup.spawn(task, "t").join(10)
                mark("supervisor: join() returns")
            total.append((time.perf_counter() - start) * 1e6)
        sup.token.cancel()
        for handle in crowd:
            handle.join(10)
    with open(log) as f:
        runs = _runs(f.readlines(), "supervisor: spawn() called")
    os.unlink(log)
    kind = "crash" if args.crash else "trivial task"
    among = f", among {args.crowd} idle tasks" if args.crowd else ""
    print(f"procsup start path, {args.method}, {kind}{among}: {len(runs)} runs, medians (us)")
    _report(runs)
    print(f"  spawn() to the end, clocked here: {statistics.median(total):.0f} us")
    what = (
        "a child's SIGKILL of itself until waitpid returns" if args.crash else "os.fork + waitpid"
    )
    print(f"  raw, in this process: {what}: {statistics.median(raw):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
