"""procsup.ray: the same critical tasks on a Ray cluster, supervised from the driver.

One ``ray.cluster_utils.Cluster`` serves the module (a head node and a second node, each with a
custom resource so a task can be pinned to it; Ray's health checks shortened so a lost node is
seen in about a second); each test makes its own ``RaySupervisor`` (its token hub and agents) and
shuts it down. The autouse leak check still runs after every test: it leaves alone the cluster's
own processes (``conftest.foreign_processes``), not what procsup starts under them.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before Ray starts: nothing leaves this machine

import concurrent.futures
import contextlib
import json
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import pytest
import ray  # the dev extra installs it: a missing Ray is a broken setup, not a skip
from ray.cluster_utils import Cluster

from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    TaskCrashedError,
    TaskFailedError,
)
from procsup._ray.channel import Channel, ChannelError
from procsup._ray.records import AgentLink
from procsup.ray import RaySupervisor
from tests import ray_tasks
from tests.conftest import foreign_processes, process_gone

DEADLINE = 60.0  # seconds: far beyond anything a passing test waits
GRACE = 1.0
HEALTH = {  # a lost node is seen in about a second (Ray's defaults: 20-60 s)
    "health_check_period_ms": 100,
    "health_check_timeout_ms": 100,
    "health_check_failure_threshold": 10,
    "health_check_initial_delay_ms": 0,
}
BIG = b"x" * 2**20  # a value that travels through Ray's object store
HEAD = {"head": 1}
SECOND = {"second": 1}
_RAY_MARKS = ("/ray/core/src/", "/ray/_private/", "/ray/dashboard/", "/ray/autoscaler/")

pytestmark = pytest.mark.timeout(180)


def is_ray(proc: psutil.Process) -> bool:
    """One of Ray's own processes: a daemon of the cluster, or a worker (``ray::...``)."""
    command = " ".join(proc.cmdline())
    return command.startswith("ray::") or any(mark in command for mark in _RAY_MARKS)


class Nodes:
    """The module's cluster and its two nodes' ids."""

    def __init__(self, cluster: Cluster, second: str) -> None:
        self.cluster = cluster
        self.head = cluster.head_node.node_id
        self.second = second


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    """A two-node cluster for the module, connected; torn down, every process of it gone."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": HEAD,
            "include_dashboard": False,
            "_system_config": HEALTH,
        },
    )
    own = {proc.pid for proc in psutil.Process().children(recursive=True)}
    try:
        second = cluster.add_node(num_cpus=1, resources=SECOND)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        # Once, before the first test's snapshot: Ray opens its channels to each node (and to
        # each node's object store, for a big value) on first use, and keeps them for the life of
        # the connection.
        with RaySupervisor(grace_period=GRACE) as sup:
            for where in (HEAD, SECOND):
                big = sup.spawn(ray_tasks.return_value, "warm-up", (BIG,), resources=where)
                assert big.join(DEADLINE) == BIG
        with foreign_processes(is_ray):
            yield Nodes(cluster, second.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()
    mine = [p for p in psutil.Process().children(recursive=True) if p.pid not in own]
    _gone, alive = psutil.wait_procs(mine, timeout=DEADLINE)
    assert not alive, f"the cluster left processes behind: {alive}"


@pytest.fixture
def sup(nodes: Nodes) -> Iterator[RaySupervisor]:
    """A RaySupervisor per test (its token hub, its agents), shut down afterwards."""
    supervisor = RaySupervisor(grace_period=GRACE)
    yield supervisor
    supervisor.shutdown()


class Fifo:
    """Lines from tasks on any node of the (one-machine) cluster, read with a deadline."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Held open so the FIFO never reads EOF between two writers (no busy select).
        self._hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._buffer = b""

    def line(self) -> list[str]:
        """The next line's words; TimeoutError after ``DEADLINE``."""
        while b"\n" not in self._buffer:
            if not select.select([self._read], [], [], DEADLINE)[0]:
                raise TimeoutError(f"no line from a task within {DEADLINE} s")
            self._buffer += os.read(self._read, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().split()

    def close(self) -> None:
        os.close(self._read)
        os.close(self._hold)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Fifo]:
    channel = Fifo(tmp_path / "fifo")
    yield channel
    channel.close()


def test_import_procsup_leaves_ray_out() -> None:
    """Test that ``import procsup`` imports neither Ray nor procsup's Ray backend (the extra is
    optional), and that ``procsup.ray`` brings them."""
    probe = (
        "import sys, procsup; print('ray' in sys.modules, 'procsup._ray' in sys.modules); "
        "import procsup.ray; print('ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    assert out.stdout.split() == ["False", "False", "True"]


def test_return_values_and_where_they_ran(sup: RaySupervisor, nodes: Nodes) -> None:
    """Test that a task returns its value from either node, and that the handle says where its
    process ran: the node id and the pid there."""
    on_head = sup.spawn(ray_tasks.where, "on head", resources=HEAD)
    on_second = sup.spawn(ray_tasks.where, "on second", resources=SECOND)
    assert on_head.join(DEADLINE) == (on_head.pid, False)
    assert on_second.join(DEADLINE) == (on_second.pid, False)
    assert (on_head.node_id, on_second.node_id) == (nodes.head, nodes.second)
    assert on_second.exitcode == 0
    big = sup.spawn(ray_tasks.return_value, "big", ({"x": BIG},), node_id=nodes.second)
    assert big.join(DEADLINE) == {"x": BIG}
    assert not sup.token.is_cancelled()


def test_the_handle_constructor_takes_a_ray_supervisor(sup: RaySupervisor, nodes: Nodes) -> None:
    """Test that CriticalTaskExecutionHandle(..., runtime=ray_supervisor) runs on the cluster, and
    that a task that is not importable there (a closure) travels by value."""
    parent = CancellationToken()
    handle = CriticalTaskExecutionHandle(ray_tasks.where, parent, "by hand", runtime=sup)
    assert handle.join(DEADLINE) == (handle.pid, False)
    assert handle.node_id in (nodes.head, nodes.second)
    offset = 40

    def closure(token: CancellationToken, value: int) -> int:
        return value + offset

    assert sup.spawn(closure, "closure", (2,), resources=SECOND).join(DEADLINE) == 42
    assert sup.spawn(lambda token: token.is_cancelled(), "lambda").join(DEADLINE) is False


def test_an_exception_carries_the_tasks_frames(sup: RaySupervisor) -> None:
    """Test that a task raising on the second node gives TaskFailedError whose __cause__ is the
    original exception with the task's own frames, and that its parent was cancelled first."""
    parent = CancellationToken()
    handle = sup.spawn(
        ray_tasks.parse_config, "config", ("not a number",), parent_token=parent, resources=SECOND
    )
    with pytest.raises(TaskFailedError) as info:
        handle.join(DEADLINE)
    error = info.value
    assert str(error).startswith("Critical task 'config' failed: ValueError: invalid literal")
    assert isinstance(error.__cause__, ValueError)
    frames = [frame.name for frame in traceback.extract_tb(error.__cause__.__traceback__)]
    assert frames[-2:] == ["parse_config", "_parse"]
    assert error.remote_traceback is not None
    assert "in _parse" in error.remote_traceback
    assert parent.is_cancelled()
    assert parent.cause == str(error).splitlines()[0]


def test_a_segfault_on_the_second_node_cancels_a_sibling_on_the_head(
    sup: RaySupervisor, fifo: Fifo
) -> None:
    """Test that a SIGSEGV on the second node is a TaskCrashedError with the signal and crash
    record seen there, and that it cancels the parent, so that a sibling on the head node wakes
    with the crash as its token's cause; the sibling's token was cancelled before join() raised."""
    parent = CancellationToken()
    sibling = sup.spawn(
        ray_tasks.wait_for_cancel, "sibling", (fifo.path,), parent_token=parent, resources=HEAD
    )
    assert fifo.line()[0] == "ready"
    crasher = sup.spawn(ray_tasks.segfault, "parser", parent_token=parent, resources=SECOND)
    with pytest.raises(TaskCrashedError) as info:
        crasher.join(DEADLINE)
    error = info.value
    assert (error.signal, error.exitcode, error.stopped) == ("SIGSEGV", -11, False)
    assert "killed by SIGSEGV (signal 11) in segfault()" in str(error)
    assert error.faulthandler_dump is not None
    assert "segfault" in error.faulthandler_dump
    assert crasher.node_id != sibling.node_id
    assert parent.cause == str(error).splitlines()[0]
    assert sibling.is_cancelled()
    assert sibling.join(DEADLINE) == f"cancelled: {parent.cause}"
    assert not sup.token.is_cancelled()


def test_cancelling_the_root_reaches_every_node(sup: RaySupervisor, fifo: Fifo) -> None:
    """Test that cancelling the supervisor's root token in the driver wakes tasks on both nodes,
    sync and async, and a child token a task made of its own, each with the root's cause."""
    handles = [
        sup.spawn(ray_tasks.wait_for_cancel, "sync head", (fifo.path,), resources=HEAD),
        sup.spawn(ray_tasks.wait_for_cancel, "sync second", (fifo.path,), resources=SECOND),
        sup.spawn(ray_tasks.wait_for_cancel_async, "async second", (fifo.path,), resources=SECOND),
        sup.spawn(ray_tasks.child_tokens, "child token", (fifo.path,), resources=SECOND),
    ]
    for _ in handles:
        assert fifo.line()[0] == "ready"
    sup.token.cancel("shutting everything down")
    assert [h.join(DEADLINE) for h in handles] == [
        "cancelled: shutting everything down",
        "cancelled: shutting everything down",
        "cancelled: shutting everything down",
        "child cancelled: shutting everything down",
    ]
    events = {h.description: h for h in handles}
    assert all(h.is_cancelled() for h in events.values())


def test_a_task_cancelling_its_own_token_is_seen_in_the_driver(
    sup: RaySupervisor, fifo: Fifo
) -> None:
    """Test that a task's cancelling its own token reaches the driver's copy while it runs, and
    that a task started under a cancelled parent starts with its token cancelled."""
    handle = sup.spawn(ray_tasks.cancel_myself, "self", (fifo.path,), resources=SECOND)
    assert fifo.line()[0] == "cancelled"
    assert handle.join(DEADLINE) == "done"
    assert handle.is_cancelled()
    parent = CancellationToken()
    parent.cancel("cancelled before the start")
    late = sup.spawn(ray_tasks.where, "late", parent_token=parent, resources=SECOND)
    assert late.join(DEADLINE) == (late.pid, True)


def test_quick_runs_keep_every_guarantee(sup: RaySupervisor, nodes: Nodes, fifo: Fifo) -> None:
    """Test that tasks that end at once, run again and again on the second node (the agent then
    answers their starts with their outcomes: one message, not two), each report their own run:
    pid, exit code, value and events; that one cancelling its own token leaves the driver's copy
    cancelled; and that a quick failure still raises with the task's frames once its parent is
    cancelled, waking a sibling on the head node."""
    events = sup.events()
    pids = set()
    for _ in range(6):
        handle = sup.spawn(ray_tasks.where, "quick", resources=SECOND)
        assert handle.join(DEADLINE) == (handle.pid, False)
        assert (handle.exitcode, handle.node_id) == (0, nodes.second)
        pids.add(handle.pid)
    assert len(pids) == 6
    assert [events.get(DEADLINE).kind for _ in range(12)] == ["started", "finished"] * 6
    events.close()
    for _ in range(3):
        own = sup.spawn(ray_tasks.cancel_myself_at_once, "self", resources=SECOND)
        assert own.join(DEADLINE) == "done"
        assert own.is_cancelled()
    parent = CancellationToken()
    sibling = sup.spawn(
        ray_tasks.wait_for_cancel, "sibling", (fifo.path,), parent_token=parent, resources=HEAD
    )
    assert fifo.line()[0] == "ready"
    for _ in range(3):  # the same failure under parents of their own first
        warm = sup.spawn(
            ray_tasks.parse_config, "warm", ("x",), parent_token=CancellationToken(),
            resources=SECOND,
        )  # fmt: skip
        with pytest.raises(TaskFailedError):
            warm.join(DEADLINE)
    failing = sup.spawn(
        ray_tasks.parse_config, "config", ("not a number",), parent_token=parent, resources=SECOND
    )
    with pytest.raises(TaskFailedError) as info:
        failing.join(DEADLINE)
    error = info.value
    assert isinstance(error.__cause__, ValueError)
    frames = [frame.name for frame in traceback.extract_tb(error.__cause__.__traceback__)]
    assert frames[-2:] == ["parse_config", "_parse"]
    assert error.pid == failing.pid
    assert parent.cause == str(error).splitlines()[0]
    assert sibling.join(DEADLINE) == f"cancelled: {parent.cause}"
    assert sup.tasks() == []
    assert not sup.token.is_cancelled()


def test_stop_escalates_on_the_node(sup: RaySupervisor, fifo: Fifo) -> None:
    """Test that stop() of tasks that ignore their token escalates on their node: SIGTERM for one,
    SIGKILL of the whole tree for one that ignores SIGTERM too; both are stops on request, and
    the parent is left alone."""
    parent = CancellationToken()
    stubborn = sup.spawn(
        ray_tasks.ignore_cancel, "stubborn", (fifo.path,), parent_token=parent, resources=SECOND
    )
    tree = sup.spawn(
        ray_tasks.ignore_sigterm, "tree", (fifo.path,), parent_token=parent, resources=SECOND
    )
    pids = [fifo.line(), fifo.line()]
    child = next(int(words[2]) for words in pids if len(words) == 3)
    with pytest.raises(TaskCrashedError) as info:
        stubborn.stop(0.2)
    assert (info.value.stopped, info.value.signal) == (True, "SIGTERM")
    assert "was stopped on request" in str(info.value)
    with pytest.raises(TaskCrashedError) as info:
        tree.stop(0.2)
    assert (info.value.stopped, info.value.signal) == (True, "SIGKILL")
    assert process_gone(child, DEADLINE)
    assert not parent.is_cancelled()


def test_a_timeout_is_a_failure_that_cancels_the_parent(sup: RaySupervisor, fifo: Fifo) -> None:
    """Test that a run over its timeout is cancelled, then killed on its node after the grace
    period, and that this crash cancels its parent (a stop on request would not)."""
    parent = CancellationToken()
    handle = sup.spawn(
        ray_tasks.ignore_cancel, "slow", (fifo.path,), parent_token=parent, resources=SECOND,
        timeout=0.2,
    )  # fmt: skip
    assert fifo.line()[0] == "ready"
    with pytest.raises(TaskCrashedError) as info:
        handle.join(DEADLINE)
    assert not info.value.stopped
    assert "exceeded its timeout of 0.2 s" in str(info.value)
    assert parent.cause == str(info.value).splitlines()[0]


def test_a_permanent_task_that_keeps_crashing_exceeds_its_intensity(sup: RaySupervisor) -> None:
    """Test that the restart policy is decided in the driver: a permanent task crashing on the
    second node is restarted there max_restarts times, then its parent is cancelled with the
    escalation's cause, and join() raises its last crash."""
    parent = CancellationToken()
    events = sup.events()
    handle = sup.spawn(
        ray_tasks.abort, "plugin host", parent_token=parent, resources=SECOND,
        restart="permanent", max_restarts=2, period=600.0, backoff=(0.0, 0.0),
    )  # fmt: skip
    with pytest.raises(TaskCrashedError) as info:
        handle.join(DEADLINE)
    assert info.value.signal == "SIGABRT"
    assert handle.restarts == 2
    assert parent.cause is not None
    assert "exceeded its restart intensity (more than 2 restarts within 600 s)" in parent.cause
    kinds = [events.get(DEADLINE).kind for _ in range(7)]
    events.close()
    assert kinds == [
        "started", "crashed", "restarted", "crashed", "restarted", "crashed", "escalated"
    ]  # fmt: skip


def test_spawn_refuses_what_cannot_run_on_the_cluster(sup: RaySupervisor, nodes: Nodes) -> None:
    """Test that spawn() refuses, before any process starts: a token among the args, resources
    no node has, an unknown node, and bad placement arguments."""
    with pytest.raises(TypeError, match="cannot be passed to a task on Ray"):
        sup.spawn(ray_tasks.return_value, "token arg", (CancellationToken(),))
    with pytest.raises(
        ValueError, match="none of the 2 alive Ray nodes has 1 CPU, 1 gpu_box in total"
    ):
        sup.spawn(ray_tasks.return_value, "no such resource", (1,), resources={"gpu_box": 1})
    with pytest.raises(ValueError, match="no alive Ray node has the id"):
        sup.spawn(ray_tasks.return_value, "no such node", (1,), node_id="ab" * 28)
    with pytest.raises(ValueError, match="has 0 head in total"):
        sup.spawn(ray_tasks.return_value, "pinned", (1,), node_id=nodes.second, resources=HEAD)
    with pytest.raises(ValueError, match="num_cpus must be a finite number >= 0"):
        sup.spawn(ray_tasks.return_value, "negative", (1,), num_cpus=-1)
    with pytest.raises(ValueError, match="use num_cpus"):
        sup.spawn(ray_tasks.return_value, "cpu", (1,), resources={"CPU": 1})
    assert sup.tasks() == []


def test_tasks_reports_each_node_s_processes(sup: RaySupervisor, fifo: Fifo) -> None:
    """Test that tasks() shows a task running on the second node with its pid and memory there."""
    handle = sup.spawn(ray_tasks.wait_for_cancel, "watched", (fifo.path,), resources=SECOND)
    assert fifo.line()[0] == "ready"
    [snapshot] = sup.tasks()
    assert (snapshot.description, snapshot.pid, snapshot.state) == (
        "watched",
        handle.pid,
        "running",
    )
    assert snapshot.rss is not None
    assert snapshot.rss > 0
    assert [node.node_id for node in sup.nodes()] == [handle.node_id]
    handle.cancel()
    assert handle.join(DEADLINE).startswith("cancelled: Critical task 'watched' was cancelled")


DRIVER = """
import sys, time
import ray
from procsup._ray.channel import Channel, ChannelError
from procsup._ray.records import AgentLink
from procsup.ray import RaySupervisor
from tests import ray_tasks
ray.init(address=sys.argv[1])
sup = RaySupervisor(grace_period=float(sys.argv[3]))
for where in ({"head": 1}, {"second": 1}):
    sup.spawn(ray_tasks.wait_for_cancel, "polite", (sys.argv[2],), resources=where).detach()
    sup.spawn(ray_tasks.ignore_sigterm, "stubborn", (sys.argv[2],), resources=where).detach()
print("started", flush=True)
time.sleep(600)
"""


def test_a_driver_killed_leaves_no_task_process(nodes: Nodes, fifo: Fifo) -> None:
    """Test that nothing outlives a SIGKILLed driver: its tasks on every node, those that honour
    their token and those that ignore it and SIGTERM (and their children), are all gone."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, nodes.cluster.address, fifo.path, str(GRACE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        pids = []
        for _ in range(4):
            words = fifo.line()
            assert words[0] == "ready"
            pids += [int(word) for word in words[1:]]
        assert len(pids) == 6  # four tasks, two of them with a child
        driver.kill()
        assert driver.wait(DEADLINE) == -signal.SIGKILL
        for pid in pids:
            assert process_gone(pid, DEADLINE), f"pid {pid} outlived its driver"
    finally:
        with contextlib.suppress(ProcessLookupError):
            driver.kill()
        driver.wait(DEADLINE)
        assert driver.stdout is not None
        driver.stdout.close()


def test_a_lost_node_is_a_crash_naming_it(sup: RaySupervisor, nodes: Nodes, fifo: Fifo) -> None:
    """Test that removing a node is a TaskCrashedError for its task that names the node, with no
    signal, and that the parent is cancelled, reaching a sibling on another node; the task
    process goes with its node. (The node is a third one, added for this test.)"""
    doomed = nodes.cluster.add_node(num_cpus=1, resources={"doomed": 1})
    nodes.cluster.wait_for_nodes()
    parent = CancellationToken()
    victim = sup.spawn(
        ray_tasks.ignore_cancel, "victim", (fifo.path,), parent_token=parent,
        resources={"doomed": 1},
    )  # fmt: skip
    sibling = sup.spawn(
        ray_tasks.wait_for_cancel, "sibling", (fifo.path,), parent_token=parent, resources=SECOND
    )
    pids = {int(fifo.line()[1]), int(fifo.line()[1])}
    assert victim.node_id == doomed.node_id
    nodes.cluster.remove_node(doomed)
    with pytest.raises(TaskCrashedError) as info:
        victim.join(DEADLINE)
    error = info.value
    assert error.signal is None
    assert not error.stopped
    assert f"lost with Ray node {doomed.node_id}" in str(error)
    assert parent.cause == str(error).splitlines()[0]
    assert sibling.join(DEADLINE) == f"cancelled: {parent.cause}"
    assert process_gone(victim.pid, DEADLINE)
    assert victim.pid in pids


def test_an_agent_that_loses_its_hub_stops_everything(sup: RaySupervisor, fifo: Fifo) -> None:
    """Test the fail-safe: an agent whose token hub is gone (its driver's, so its driver) cancels
    every task it runs, saying why; the supervisor, having lost its hub, starts nothing more."""
    handle = sup.spawn(ray_tasks.wait_for_cancel, "orphan", (fifo.path,), resources=SECOND)
    assert fifo.line()[0] == "ready"
    ray.kill(sup._backend._hub)  # what the driver's death does to it
    value = handle.join(DEADLINE)
    assert value.startswith("cancelled: the procsup agent on Ray node ")
    assert "lost its driver: its driver's token hub is gone" in value
    assert sup.closed
    with pytest.raises(RuntimeError, match="lost its token hub"):
        sup.spawn(ray_tasks.return_value, "too late", (1,))


def test_a_node_that_does_not_answer_a_stop_has_its_agent_killed(
    sup: RaySupervisor, fifo: Fifo
) -> None:
    """Test that stop() of a task whose node does not answer (its agent is frozen) kills the agent
    with ray.kill once the grace period is over: the task is stopped on request, its parent left
    alone, and the task process itself is stopped on the node by its zygote all the same."""
    parent = CancellationToken()
    handle = sup.spawn(
        ray_tasks.ignore_cancel, "frozen", (fifo.path,), parent_token=parent, resources=SECOND
    )
    assert fifo.line()[0] == "ready"
    [node] = sup.nodes()
    os.kill(node.agent_pid, signal.SIGSTOP)
    try:
        with pytest.raises(TaskCrashedError) as info:
            handle.stop(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.agent_pid, signal.SIGCONT)
    error = info.value
    assert error.stopped
    assert error.signal is None
    assert "its agent on Ray node" in str(error)
    assert "did not answer within 1 s" in str(error)
    assert not parent.is_cancelled()
    assert process_gone(handle.pid, DEADLINE)


def test_the_demo_runs_the_crash_scenario_on_two_nodes(nodes: Nodes) -> None:
    """Test that ``python -m procsup --backend ray`` tells the crash scenario on its own two-node
    cluster in order: four starts on both nodes, the parser's segfault on the second node with
    its crash record, the root's cancellation, every other task's clean-up, exit 1."""
    demo = subprocess.run(
        [sys.executable, "-m", "procsup", "--backend", "ray", "--json"],
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    events = [json.loads(line) for line in demo.stdout.splitlines()]
    assert demo.returncode == 1, demo.stderr
    kinds = [event["event"] for event in events]
    assert kinds == ["begin", "cluster"] + ["started"] * 4 + ["crashed", "cancelled"] + [
        "finished"
    ] * 3 + ["exit"]
    names = events[1]["nodes"]
    assert sorted(names.values()) == ["head", "second"]
    assert [names[event["node"]] for event in events[2:6]] == ["head"] + ["second"] * 3
    crash = events[6]["record"]
    assert (crash["task"], crash["signal"], crash["exit code"]) == ("native parser", "SIGSEGV", -11)
    assert crash["node"].startswith("the second node")
    assert "Critical task 'native parser' crashed" in events[7]["text"]


def test_a_dead_agent_is_replaced_and_limits_apply_on_the_node(sup: RaySupervisor) -> None:
    """Test that a start after the node's agent died (nothing running there) gets a new agent,
    and that a memory limit is applied on the node: the task fails there with MemoryError."""
    first = sup.spawn(ray_tasks.where, "first", resources=SECOND)
    first.join(DEADLINE)
    [node] = sup.nodes()
    os.kill(node.agent_pid, signal.SIGKILL)
    assert process_gone(node.agent_pid, DEADLINE)
    second = sup.spawn(ray_tasks.where, "after", resources=SECOND)
    assert second.join(DEADLINE) == (second.pid, False)
    assert [n.agent_pid for n in sup.nodes()] != [node.agent_pid]
    parent = CancellationToken()
    hungry = sup.spawn(
        ray_tasks.allocate, "hungry", (2**30,), parent_token=parent, resources=SECOND,
        memory_limit=256 * 2**20,
    )  # fmt: skip
    with pytest.raises(TaskFailedError, match="MemoryError"):
        hungry.join(DEADLINE)
    assert parent.is_cancelled()


# ------------------------------------------------------------ the direct channel


def _link(sup: RaySupervisor, node_id: str) -> AgentLink:
    """The driver's link to the node's agent (a start there booted it)."""
    return sup._backend._agents[node_id]


def _counts(link: AgentLink) -> dict[str, int]:
    """The agent's starts by the door ("direct"), by Ray ("ray"), and second copies."""
    counts: dict[str, int] = ray.get(link.actor.counts.remote(), timeout=DEADLINE)
    return counts


def _runs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def test_starts_go_by_the_direct_channel(sup: RaySupervisor, nodes: Nodes, tmp_path: Path) -> None:
    """Test that starts on a node, one after another and four at once, go by its agent's door,
    not by Ray, each run once."""
    path = tmp_path / "runs"
    pids = [sup.spawn(ray_tasks.append_pid, "one", (str(path),), resources=SECOND).join(DEADLINE)]
    pids += [sup.spawn(ray_tasks.append_pid, "one", (str(path),), resources=SECOND).join(DEADLINE)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        handles = list(
            pool.map(
                lambda _: sup.spawn(ray_tasks.append_pid, "four", (str(path),), resources=SECOND),
                range(4),
            )
        )
    pids += [handle.join(DEADLINE) for handle in handles]
    assert sorted(_runs(path)) == sorted(pids)
    assert len(set(pids)) == 6
    assert _counts(_link(sup, nodes.second)) == {"direct": 6, "ray": 0, "repeated": 0}


def test_the_direct_channel_refuses_a_wrong_key(sup: RaySupervisor, nodes: Nodes) -> None:
    """Test that a connection to an agent's door with another key is refused before a request is
    read, and that the door goes on serving its driver."""
    sup.spawn(ray_tasks.where, "boot", resources=SECOND).join(DEADLINE)
    link = _link(sup, nodes.second)
    assert link.channel is not None
    intruder = Channel(link.channel._address, os.urandom(32))
    with pytest.raises(ChannelError, match="AuthenticationError"):
        intruder.call(b"not a start", time.monotonic() + DEADLINE)
    assert intruder.broken is not None
    intruder.close()
    handle = sup.spawn(ray_tasks.where, "after", resources=SECOND)
    assert handle.join(DEADLINE) == (handle.pid, False)
    assert _counts(link) == {"direct": 2, "ray": 0, "repeated": 0}


class _Cut:
    """A driver's connection to a door, cut in the middle of a start: ``when`` the request is
    half sent, once it is sent, or once its answer has come (and is lost with the connection)."""

    def __init__(self, conn: Connection, when: str) -> None:
        self._conn = conn
        self._when = when

    def send_bytes(self, data: bytes) -> None:
        if self._when == "mid-request":
            os.write(self._conn.fileno(), struct.pack("!i", len(data)) + data[: len(data) // 2])
        else:
            self._conn.send_bytes(data)
            if self._when == "after the answer":
                assert self._conn.poll(DEADLINE)
        self._conn.close()
        raise ConnectionResetError("cut by the test")

    def close(self) -> None:
        self._conn.close()


@pytest.mark.parametrize("when", ["mid-request", "before the answer", "after the answer"])
def test_a_start_cut_on_the_direct_channel_runs_once(
    sup: RaySupervisor, nodes: Nodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Test that a start whose connection is cut (mid-request, before or after the agent's
    answer) is sent again by Ray and runs exactly once, its outcome not lost, even for a quick
    task whose outcome rode the lost answer."""
    path = tmp_path / "runs"
    pids = [
        sup.spawn(ray_tasks.append_pid, "quick", (str(path),), resources=SECOND).join(DEADLINE)
        for _ in range(3)  # quick here now: its start may answer with its outcome
    ]
    link = _link(sup, nodes.second)
    assert link.channel is not None
    take = link.channel._take
    cut: list[object] = []

    def take_once(deadline: float) -> Connection | _Cut:
        conn = take(deadline)
        if cut:
            return conn
        cut.append(conn)
        return _Cut(conn, when)

    monkeypatch.setattr(link.channel, "_take", take_once)
    handle = sup.spawn(ray_tasks.append_pid, "cut", (str(path),), resources=SECOND)
    pids.append(handle.join(DEADLINE))
    assert pids[-1] == handle.pid
    assert cut
    counts = _counts(link)
    if when == "before the answer":  # which copy came first is a race: wait for the other
        deadline = time.monotonic() + DEADLINE
        while counts["repeated"] == 0 and time.monotonic() < deadline:
            counts = _counts(link)
        assert counts["direct"] + counts["ray"] == 4
        assert counts["repeated"] == 1
    else:
        assert (
            counts
            == {
                "mid-request": {"direct": 3, "ray": 1, "repeated": 0},
                "after the answer": {"direct": 4, "ray": 0, "repeated": 1},
            }[when]
        )
    assert _runs(path) == pids
    again = sup.spawn(ray_tasks.append_pid, "again", (str(path),), resources=SECOND)
    assert again.join(DEADLINE) == again.pid
    assert _counts(link)["direct"] == counts["direct"] + 1  # the channel serves on


def test_a_start_after_the_door_closed_goes_by_ray(
    sup: RaySupervisor, nodes: Nodes, tmp_path: Path
) -> None:
    """Test that once an agent's door is closed, starts go by Ray: the first finds its pooled
    connection ended, the next one cannot connect and turns the channel off."""
    path = tmp_path / "runs"
    pids = [
        sup.spawn(ray_tasks.append_pid, "direct", (str(path),), resources=SECOND).join(DEADLINE)
    ]
    link = _link(sup, nodes.second)
    assert link.channel is not None
    assert ray.get(link.actor.close_door.remote(DEADLINE), timeout=DEADLINE) is True
    for _ in range(3):
        pids.append(
            sup.spawn(ray_tasks.append_pid, "by ray", (str(path),), resources=SECOND).join(DEADLINE)
        )
    assert _runs(path) == pids
    assert _counts(link) == {"direct": 1, "ray": 3, "repeated": 0}
    assert link.channel.broken is not None
    assert "could not be opened" in link.channel.broken
