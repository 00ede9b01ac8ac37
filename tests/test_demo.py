"""The demo (``python -m procsup``): every scenario end to end, in a real subprocess.

Each run reads the ``--json`` event stream and checks the story in order, restarts and escalations
included. Handshakes (Ctrl-C after the tasks have started) wait on that stream, never on a sleep;
every read has a deadline. Two runs use a pseudo-terminal: the rich live view with Ctrl-C, and the
plain fallback without rich.

The orders checked here are the demo's own handshakes, not its schedules: the act that ends a story
(the parser's segfault, the plugin's last crash) waits for a cue that the demo gives once every
other task has played its part and been shown (``procsup.demo.tasks``). So the cache's restart
and the coordinator's sub-task come before the segfault, and the fetcher's recovery before the
plugin's escalation, however late a busy machine runs the schedules. One schedule is left, in the
Ctrl-C runs: the interrupt must land before the story's first failure (the cache builder's memory
limit, ~3 s in); the tests send it the moment they read that every task has started.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup.demo.output import make_view
from procsup.demo.stress import percentiles
from procsup.demo.view import JsonView, PlainView

DEADLINE = 60.0  # seconds; a passing run takes a few
ROOT = Path(__file__).resolve().parent.parent
SIBLINGS = ("cpu worker", "io worker", "coordinator", "async heartbeat")
LEAKER, FLAKY, PLUGIN = "cache builder", "flaky fetcher", "plugin host"
NO_RICH = (
    "import sys; sys.modules['rich'] = None; from procsup.demo.main import main; sys.exit(main())"
)

Event = dict[str, Any]


def run_demo(*args: str) -> tuple[int, list[Event], str]:
    """Run the demo with ``--json`` to completion; return its exit code, events and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "procsup", "--json", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    return proc.returncode, events, proc.stderr


def story(events: list[Event]) -> list[tuple[str, str | None]]:
    """The events without the periodic status objects, as (event, task) pairs."""
    return [(e["event"], e.get("task")) for e in events if e["event"] != "status"]


def find(events: list[Event], kind: str, task: str | None = None) -> Event:
    matches = [e for e in events if e["event"] == kind and (task is None or e.get("task") == task)]
    assert len(matches) == 1, f"expected one {kind!r} event for {task!r}: {story(events)}"
    return matches[0]


def runs(events: list[Event], kind: str, task: str) -> list[Event]:
    """Every ``kind`` event of ``task``, in order (a restarted task has one per run)."""
    return [e for e in events if e["event"] == kind and e.get("task") == task]


def position(events: list[Event], kind: str, task: str | None = None) -> int:
    return events.index(find(events, kind, task))


def check_clean_shutdown(events: list[Event], code: int, culprit: str | None) -> None:
    """Every sibling stops after the root's cancellation, then the summary, then the exit code."""
    started = [e["task"] for e in events if e["event"] == "started"]
    assert set(SIBLINGS) <= set(started)
    cancelled = position(events, "cancelled")
    if culprit is not None:
        assert position(events, "crashed" if culprit == "native parser" else "failed", culprit) < (
            cancelled
        ), story(events)
    for name in SIBLINGS:
        finished = find(events, "finished", name)
        assert cancelled < position(events, "stopping", name) < events.index(finished)
        assert finished["exitcode"] == 0
        assert finished["result"]
    coordinator = find(events, "finished", "coordinator")["result"]
    assert "sub-task 'shard reader'" in coordinator
    assert "closed 3 shards" in coordinator
    summary = find(events, "summary")
    assert {row["task"] for row in summary["tasks"]} == set(started)
    assert all(row["state"] == "done" for row in summary["tasks"] if row["task"] in SIBLINGS)
    assert events[-1]["event"] == "exit"
    assert events[-1]["code"] == code
    assert position(events, "summary") < len(events) - 1
    for event in events:
        if event["event"] in ("started", "subtask"):
            assert not psutil.pid_exists(event["pid"]), f"{event} outlived the demo"


@pytest.fixture(scope="module")
def default_run() -> tuple[int, list[Event], str]:
    """One run of the default scenario, shared by the tests that read its story."""
    return run_demo()


def test_default_scenario_crash_cancels_root_and_everyone_cleans_up(
    default_run: tuple[int, list[Event], str],
) -> None:
    """Test the default run: segfault record, root cancelled with its cause, siblings, exit 1."""
    code, events, stderr = default_run
    assert code == 1, story(events)
    assert events[0]["event"] == "begin"
    assert events[0]["scenario"] == "crash"
    assert events[0]["start_method"] == "forkserver"
    assert [kind for kind, _ in story(events)[1:7]] == ["started"] * 6
    crash = find(events, "crashed", "native parser")
    assert crash["signal"] == "SIGSEGV"
    assert crash["exitcode"] == -signal.SIGSEGV
    assert crash["record"]["pid"] == crash["pid"]
    assert "peak RSS" in crash["record"]
    subtask = find(events, "subtask", "coordinator")
    assert subtask["name"] == "demo:subtask"
    assert position(events, "subtask") < events.index(crash)
    cause = find(events, "cancelled")["cause"]
    assert cause.startswith("Critical task 'native parser' crashed: killed by SIGSEGV")
    check_clean_shutdown(events, 1, "native parser")
    assert "native parser" in events[-1]["reason"]
    assert "SIGSEGV" in events[-1]["reason"]
    assert any(e["event"] == "status" for e in events)
    assert "Traceback" not in stderr


def test_default_scenario_memory_limit_restarts_the_leaking_cache(
    default_run: tuple[int, list[Event], str],
) -> None:
    """Test the leak: its memory_limit fails a run (MemoryError), a restart, a clean finish."""
    code, events, _ = default_run
    assert code == 1, story(events)
    started = find(events, "started", LEAKER)
    assert started["restart"] == "transient"
    assert "memory_limit=96.0 MiB" in started["text"]
    over, *_ = runs(events, "failed", LEAKER)
    assert over["run"] == 1
    assert over["text"].startswith(
        f"Critical task '{LEAKER}' failed: MemoryError: memory limit exceeded "
        "(memory_limit=96.0 MiB, RLIMIT_DATA): the cache could not grow past"
    ), over
    restarted, *_ = runs(events, "restarted", LEAKER)
    assert restarted["restarts"] == 1
    assert restarted["pid"] != over["pid"]
    assert "MemoryError: memory limit exceeded" in restarted["last_failure"]
    # The limit is a restart, not the story's failure: the segfault cancels the root.
    crash = position(events, "crashed", "native parser")
    assert events.index(over) < events.index(restarted) < crash
    assert find(events, "cancelled")["cause"].startswith("Critical task 'native parser' crashed")
    finished = find(events, "finished", LEAKER)
    assert position(events, "cancelled") < events.index(finished)
    assert finished["result"].startswith("dropped its")
    assert finished["restarts"] >= 1
    row = next(row for row in find(events, "summary")["tasks"] if row["task"] == LEAKER)
    assert row["state"] == "done"
    assert row["peak_rss"] > 64 * 2**20  # it did grow to its limit


def test_error_scenario_shows_the_child_traceback_under_fork() -> None:
    """Test a Python exception in a task: its child-side traceback, then the clean shutdown."""
    code, events, stderr = run_demo("--scenario", "error", "--start-method", "fork")
    assert code == 1, story(events)
    assert events[0]["start_method"] == "fork"
    failed = find(events, "failed", "config loader")
    assert failed["text"].startswith("Critical task 'config loader' failed: ValueError: line 3")
    traceback = failed["record"]["child traceback"]
    assert "in _parse_line" in traceback
    assert "int(value)" in traceback
    assert "The above exception was the direct cause" in traceback
    cause = find(events, "cancelled")["cause"]
    assert cause.startswith("Critical task 'config loader' failed: ValueError")
    check_clean_shutdown(events, 1, "config loader")
    assert "Traceback" not in stderr


def test_graceful_scenario_under_spawn_exits_zero() -> None:
    """Test the demo cancelling the root itself: nothing fails, every task returns, exit 0."""
    code, events, stderr = run_demo("--scenario", "graceful", "--start-method", "spawn")
    assert code == 0, story(events)
    assert events[0]["start_method"] == "spawn"
    assert not [e for e in events if e["event"] in ("crashed", "failed", "panicked", "stopped")]
    assert "time is up" in find(events, "cancelled")["cause"]
    check_clean_shutdown(events, 0, None)
    assert "Traceback" not in stderr


def test_restart_scenario_recovers_then_escalates() -> None:
    """Test restarts with backoff, then a crash loop over its intensity cancelling the root."""
    code, events, stderr = run_demo("--scenario", "restart")
    assert code == 1, story(events)
    # The flaky fetcher: refused twice, restarted twice (exponential backoff), then recovers.
    failed = runs(events, "failed", FLAKY)
    restarted = runs(events, "restarted", FLAKY)
    assert [e["run"] for e in failed] == [1, 2]
    assert all("ConnectionRefusedError" in e["text"] for e in failed)
    assert [e["restarts"] for e in restarted] == [1, 2]
    order = [events.index(e) for e in (failed[0], restarted[0], failed[1], restarted[1])]
    assert order == sorted(order), story(events)
    assert "refused attempt 2" in restarted[1]["last_failure"]
    assert restarted[0]["backoff"] >= 0.1  # backoff (0.25, 1.0) with jitter in [0.5, 1]
    assert restarted[1]["backoff"] >= 0.2  # doubled for the second restart
    # The plugin host: three crashes, two restarts, then its intensity is exceeded.
    crashes = runs(events, "crashed", PLUGIN)
    assert [e["run"] for e in crashes] == [1, 2, 3]
    assert {e["signal"] for e in crashes} == {"SIGABRT"}
    assert [e["restarts"] for e in runs(events, "restarted", PLUGIN)] == [1, 2]
    escalated = find(events, "escalated", PLUGIN)
    assert events.index(crashes[-1]) < events.index(escalated) < position(events, "cancelled")
    intensity = f"Critical task '{PLUGIN}' exceeded its restart intensity (more than 2 restarts"
    assert escalated["cause"].startswith(intensity)
    assert len([key for key in escalated["record"] if key.startswith("run ")]) == 3
    cause = find(events, "cancelled")["cause"]
    assert cause == escalated["cause"]
    assert restarted[1]["t"] < escalated["t"]  # the fetcher had recovered by then
    # Everyone else, the recovered fetcher too, shuts down gracefully.
    check_clean_shutdown(events, 1, None)
    fetched = find(events, "finished", FLAKY)
    assert (
        position(events, "cancelled")
        < position(events, "stopping", FLAKY)
        < (events.index(fetched))
    )
    assert fetched["result"].startswith("connected on attempt 3")
    summary = {row["task"]: row for row in find(events, "summary")["tasks"]}
    assert (summary[FLAKY]["state"], summary[FLAKY]["restarts"]) == ("done", 2)
    assert (summary[PLUGIN]["state"], summary[PLUGIN]["restarts"]) == ("escalated", 2)
    assert events[-1]["reason"].startswith(intensity)
    assert "Traceback" not in stderr


def test_stress_scenario_reports_throughput_and_percentiles() -> None:
    """Test 300 short tasks: all return their value, progress in order, sane percentiles."""
    code, events, _ = run_demo("--scenario", "stress")
    assert code == 0, story(events)
    assert [e["done"] for e in events if e["event"] == "progress"] == [100, 200, 300]
    stress = find(events, "stress")
    assert stress["completed"] == stress["total"] == 300
    assert stress["throughput"] > 0
    latency = stress["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert events[-1] == {**events[-1], "event": "exit", "code": 0}


class DemoProcess:
    """A demo subprocess whose ``--json`` stream is read line by line, each read with a deadline."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "procsup", "--json", *args],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout
        self.events: list[Event] = []
        self.deadline = time.monotonic() + DEADLINE

    def read_until(self, done: Callable[[Event], bool]) -> Event:
        """Read events until one satisfies ``done``; fail at EOF or at the deadline."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.stdout, selectors.EVENT_READ)
            while True:
                remaining = self.deadline - time.monotonic()
                assert remaining > 0, "the demo went silent"
                assert selector.select(remaining), "the demo went silent"
                line = self.stdout.readline()
                assert line, f"the demo ended early: {story(self.events)}"
                self.events.append(json.loads(line))
                if done(self.events[-1]):
                    return self.events[-1]

    def finish(self) -> int:
        """Read the rest of the stream; return the exit code once the demo has exited."""
        self.read_until(lambda event: event["event"] == "exit")
        with selectors.DefaultSelector() as selector:
            selector.register(self.stdout, selectors.EVENT_READ)
            remaining = self.deadline - time.monotonic()
            assert selector.select(remaining), "the demo did not exit after its exit event"
            assert not self.stdout.readline(), "output after the exit event"
        return self.proc.wait(max(0.0, self.deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        self.stdout.close()


@pytest.fixture
def demo() -> Iterator[Callable[..., DemoProcess]]:
    made: list[DemoProcess] = []

    def start(*args: str) -> DemoProcess:
        made.append(DemoProcess(*args))
        return made[-1]

    yield start
    for process in made:
        process.close()


def test_ctrl_c_cancels_the_root_and_everyone_cleans_up(demo: Callable[..., DemoProcess]) -> None:
    """Test SIGINT once every task has started: cause says SIGINT, no crash, exit 130."""
    run = demo()
    started = 0

    def all_started(event: Event) -> bool:
        nonlocal started
        started += 1 if event["event"] == "started" else 0
        return started == 6

    run.read_until(all_started)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130
    events = run.events
    assert position(events, "interrupt") < position(events, "cancelled")
    assert find(events, "cancelled")["cause"].startswith("SIGINT (Ctrl-C)")
    parser = find(events, "finished", "native parser")
    assert parser["result"].startswith("stopped before the bad record")
    assert find(events, "finished", LEAKER)["result"].startswith("dropped its")
    assert not [e for e in events if e["event"] in ("crashed", "failed", "stopped")]
    check_clean_shutdown(events, 130, None)


def run_on_terminal(argv: list[str], interrupt_after: str | None = None) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal; optionally SIGINT it once ``interrupt_after`` shows."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + DEADLINE
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(master, selectors.EVENT_READ)
            while time.monotonic() < deadline and selector.select(deadline - time.monotonic()):
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not chunk:
                    break
                output += chunk
                if interrupt_after is not None and interrupt_after in _plain(output):
                    proc.send_signal(signal.SIGINT)
                    interrupt_after = None
        code = proc.wait(DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
        os.close(master)
    return code, _plain(output)


def _plain(output: bytes) -> str:
    """Terminal output without its escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))


def test_terminal_live_view_and_ctrl_c_with_rich() -> None:
    """Test the rich live table on a terminal, and that Ctrl-C shows on screen (exit 130)."""
    pytest.importorskip("rich")
    argv = [sys.executable, "-m", "procsup"]
    code, screen = run_on_terminal(argv, interrupt_after="started    native parser")
    assert code == 130, screen
    assert "procsup: critical tasks (live)" in screen
    assert "┃ task" in screen
    assert "interrupt  Ctrl-C: cancelling the root token" in screen
    assert "summary" in screen
    assert "exit 130: interrupted (Ctrl-C)" in screen


def test_terminal_without_rich_degrades_to_plain_lines() -> None:
    """Test that a terminal without rich gets the plain timestamped view, the whole story."""
    code, screen = run_on_terminal([sys.executable, "-c", NO_RICH, "--scenario", "error"])
    assert code == 1, screen
    assert "┃" not in screen
    assert re.search(r"\[ *\d+\.\d\ds\] started    cpu worker", screen)
    assert re.search(r"\[ *\d+\.\d\ds\] failed     Critical task 'config loader' failed", screen)
    assert "child traceback:  Traceback (most recent call last):" in screen
    assert re.search(r"\[ *\d+\.\d\ds\] exit       exit 1: Critical task 'config loader'", screen)


def test_view_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test JSON when asked, plain lines off a terminal, and plain on a terminal without rich."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_view(True, Terminal()), JsonView)
    assert type(make_view(False, io.StringIO())) is PlainView
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.delitem(sys.modules, "procsup.demo.rich_view", raising=False)
    assert type(make_view(False, Terminal())) is PlainView


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"], ids=["closed", "full"])
def test_output_nobody_can_read_still_ends_the_story(redirect: str) -> None:
    """Test the demo with its stdout closed (``>&-``) or on a full disk (``> /dev/full``): the
    story runs to its end (exit 1: the native parser's crash), with no traceback of the demo's
    own (it raised AttributeError on a closed stdout, OSError on a full one)."""
    proc = subprocess.run(
        ["sh", "-c", f'exec "$0" -m procsup {redirect}', sys.executable],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_explains_each_scenario_in_one_line() -> None:
    """Test ``--help``: every scenario named on a line of its own, with its explanation."""
    out = subprocess.run(
        [sys.executable, "-m", "procsup", "--help"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "100"},
        check=True,
    ).stdout
    for name in ("crash", "error", "graceful", "restart", "stress"):
        assert re.search(rf"^  {name} +\S.+$", out, re.MULTILINE), name
    assert "--start-method" in out
    assert "--json" in out


def test_the_library_does_not_import_rich() -> None:
    """Test that ``import procsup`` leaves rich (the demo's optional extra) alone."""
    code = "import sys, procsup; assert 'rich' not in sys.modules, 'procsup imported rich'"
    subprocess.run([sys.executable, "-c", code], timeout=DEADLINE, cwd=ROOT, check=True)


def test_percentiles_are_measured_values() -> None:
    """Test nearest-rank percentiles: each one is a sample, in order."""
    samples = [float(n) for n in range(1, 101)]
    assert percentiles(samples) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([0.5]) == {"p50": 0.5, "p90": 0.5, "p99": 0.5, "max": 0.5}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def _demo_recipe() -> str:
    """The ``make demo`` recipe as the shell gets it, ``$(DEMO)`` left to fill in."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:])
    text = "\n".join(recipe).replace("\\\n", "").lstrip("@")
    assert "\n" not in text, "one shell runs the whole recipe only if it is one logical line"
    assert text.count("$(DEMO)") == 2  # echoed, then run
    text = text.replace("$$", "$")
    assert "$(" not in text.replace("$(DEMO)", ""), "a make variable the test does not expand"
    return text


@pytest.mark.parametrize(
    ("demo_status", "make_status"),
    [(0, 0), (1, 0), (2, 2), (130, 130), (139, 139)],
    ids=["graceful", "story ended as designed", "usage error", "Ctrl-C", "crashed"],
)
def test_make_demo_accepts_the_designed_exit_status(
    demo_status: int, make_status: int, tmp_path: Path
) -> None:
    """Test the ``make demo`` recipe (run by sh as make would, with a stand-in demo; make itself
    is not run, it would set up the virtualenv): exit 1, how the default story ends, passes, so
    the output ends on the story's last line; any other failure still fails."""
    stand_in = tmp_path / "demo"
    stand_in.write_text(f'#!/bin/sh\necho "the story\'s last line"\nexit {demo_status}\n')
    stand_in.chmod(0o755)
    script = _demo_recipe().replace("$(DEMO)", str(stand_in))
    proc = subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=DEADLINE
    )
    assert proc.returncode == make_status
    assert proc.stdout.splitlines() == [str(stand_in), "the story's last line"]
    assert proc.stderr == ""
