"""Tests that a process stopped while it holds the token arena's lock stalls nobody else.

A stopped process (SIGSTOP, a debugger, a cgroup freezer) keeps its record locks for as long as
it is stopped. Each trial stops a process that churns tokens at a random instant of its loop,
and, whenever that instant was inside the lock, checks that another process's cancel() returns
and wakes its waiters while the holder is still stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from procsup import CancellationToken, Supervisor, TaskCrashedError
from procsup._token import arena as _arena
from procsup._token.arena import _H_LOCK_WAITERS, _H_REQUESTS, PULL_BIT, Arena
from procsup._token.futex import futex_or_wake
from tests import tasks, token_tasks

DEADLINE = 30.0
TRIALS_IN_THE_LOCK = 25  # trials whose stop landed inside the lock
MAX_TRIALS = 2_000


def lock_holder() -> int | None:
    return Arena.default().holder()


def stop(pid: int) -> None:
    """SIGSTOP ``pid`` and return once it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    try:
        os.waitid(os.P_PID, pid, os.WSTOPPED)  # our child: the kernel says when
        return
    except ChildProcessError:  # a task, the zygote's or a shim's child: no blocking wait exists
        pass
    proc = psutil.Process(pid)
    for _ in range(100_000):
        if proc.status() == psutil.STATUS_STOPPED:
            return
        os.sched_yield()
    pytest.fail(f"pid {pid} did not stop")


def stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


@contextmanager
def churning(ctx: Any, token: CancellationToken) -> Iterator[Any]:
    """A child process churning tokens below ``token``; continued and killed afterwards."""
    ready = CancellationToken()
    proc = ctx.Process(target=token_tasks.churn, args=(token, ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(DEADLINE)
        yield proc
    finally:
        if proc.exitcode is None:  # not killed by the test itself
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.join(DEADLINE)


def stop_inside_the_lock(pid: int, rng: random.Random) -> int:
    """Stop ``pid`` at random instants until one lands inside the arena lock; return the tries."""
    for attempt in range(1, MAX_TRIALS + 1):
        # Spread the instants over the churn loop; this picks an instant, it synchronises nothing.
        for _ in range(rng.randrange(2_000)):
            pass
        stop(pid)
        if lock_holder() == pid:
            return attempt
        os.kill(pid, signal.SIGCONT)
    pytest.fail(f"no stop in {MAX_TRIALS} landed inside the lock")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cancel_wakes_waiters_while_a_stopped_process_holds_the_lock(method: str) -> None:
    """Test that cancel() returns and wakes a waiter in a third process, with the right cause,
    while the churning process that holds the arena lock stays stopped, in every trial."""
    ctx: Any = multiprocessing.get_context(method)
    rng = random.Random(1234)
    root = CancellationToken()
    targets = [root.child_token() for _ in range(TRIALS_IN_THE_LOCK)]
    watched = [target.child_token() for target in targets]  # woken through their parent
    ready = CancellationToken()
    reader, writer = ctx.Pipe(duplex=False)
    waiter = ctx.Process(target=token_tasks.report_wakes, args=(watched, ready, writer))
    waiter.start()
    writer.close()
    try:
        assert ready.wait(DEADLINE)
        with churning(ctx, root.child_token()) as churner:
            for trial, (target, child) in enumerate(zip(targets, watched, strict=True)):
                stop_inside_the_lock(churner.pid, rng)
                target.cancel(f"trial {trial}")
                # Everything below happens while the holder is still stopped with the lock.
                assert child.is_cancelled()
                assert child.cause == f"trial {trial}"
                assert reader.poll(DEADLINE), f"trial {trial}: the waiter was not woken"
                assert reader.recv() == (trial, True, True, f"trial {trial}")
                assert stopped(churner.pid)
                assert lock_holder() == churner.pid
                os.kill(churner.pid, signal.SIGCONT)
            # Once the holder runs again, the requests are carried out under the lock.
            stop(churner.pid)
            os.kill(churner.pid, signal.SIGCONT)
        arena = Arena.default()
        arena.lock()
        arena.unlock()
        assert arena.words[_H_REQUESTS] == 0
        for trial, child in enumerate(watched):
            assert child._words[child._word] & 1, "the request's cancel() was not carried out"
            assert child.cause == f"trial {trial}"
        assert not root.is_cancelled()
    finally:
        waiter.join(DEADLINE)
        reader.close()
    assert waiter.exitcode == 0


def test_a_patient_cancel_is_woken_by_the_unlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that cancel() waiting for a lock another process holds is woken when it is given
    back, takes it and cancels there (no request filed), however long its patience."""
    monkeypatch.setattr(_arena, "PATIENCE", 2 * DEADLINE)  # a lost wake-up fails the join
    ctx: Any = multiprocessing.get_context("fork")
    arena = Arena.default()
    token = CancellationToken()
    here, there = ctx.Pipe()
    holder = ctx.Process(target=token_tasks.hold_the_lock, args=(there,))
    holder.start()
    try:
        assert here.poll(DEADLINE)
        assert here.recv() == "held"
        canceller = threading.Thread(target=token.cancel, args=("patient",))
        arena.words[_H_LOCK_WAITERS] = 0  # a hint only: whoever waits sets it again
        canceller.start()
        for _ in range(10_000_000):  # the canceller says it waits: a handshake
            if arena.words[_H_LOCK_WAITERS]:
                break
            os.sched_yield()
        else:
            pytest.fail("cancel() never waited for the lock")
        assert not token.is_cancelled()
        here.send("go")
        canceller.join(DEADLINE)
        assert not canceller.is_alive()
    finally:
        holder.join(DEADLINE)
        here.close()
    assert token.cause == "patient"
    assert arena.words[_H_REQUESTS] == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_holder_leaves_a_consistent_tree(method: str) -> None:
    """Test that SIGKILLing the churner inside the lock, after requests were filed behind it,
    leaves a tree whose next lock holder carries the requests out."""
    ctx: Any = multiprocessing.get_context(method)
    rng = random.Random(99)
    for trial in range(5):
        root = CancellationToken()
        target = root.child_token()
        below = target.child_token().child_token()
        with churning(ctx, root.child_token()) as churner:
            stop_inside_the_lock(churner.pid, rng)
            target.cancel(f"killed {trial}")
            assert below.cause == f"killed {trial}"
            churner.kill()
            churner.join(DEADLINE)
        other = root.child_token()  # the next lock holder repairs, then links
        assert below._words[below._word] & 1
        assert below.cause == f"killed {trial}"
        assert not other.is_cancelled()
        root.cancel("root")
        assert other.cause == "root"
        assert below.cause == f"killed {trial}"


def test_a_crash_is_reported_while_a_stopped_task_holds_the_lock(runtime: Supervisor) -> None:
    """Test that the supervisor reports another task's crash, and cancels its parent, while a
    task stopped inside the arena lock still holds it."""
    ready = CancellationToken()
    churner = runtime.spawn(token_tasks.churn, "churner", args=(ready,))
    victim = runtime.spawn(tasks.wait_for_cancel, "victim")
    try:
        assert ready.wait(DEADLINE)
        pid = churner.pid
        assert pid is not None
        stop_inside_the_lock(pid, random.Random(pid))
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(TaskCrashedError, match="SIGKILL"):
            victim.join(DEADLINE)
        assert runtime.token.is_cancelled()
        assert "victim" in (runtime.token.cause or "")
        assert stopped(pid)
        assert lock_holder() == pid
    finally:
        if churner.pid is not None:
            os.kill(churner.pid, signal.SIGCONT)
    with pytest.raises(TaskCrashedError, match="stopped"):
        churner.stop(timeout=0)


def test_a_restart_is_put_off_while_a_stopped_task_holds_the_lock(
    runtime: Supervisor, tmp_path: Path
) -> None:
    """Test that a restart due while a stopped task holds the arena lock waits without stalling
    the supervision thread: another task's crash is reported meanwhile, and the restart happens
    once the holder runs again."""
    ready, go, elsewhere = CancellationToken(), CancellationToken(), CancellationToken()
    events = runtime.events()
    churner = runtime.spawn(token_tasks.churn, "churner", args=(ready,))
    flaky = runtime.spawn(
        token_tasks.fail_once,
        "flaky",
        args=(go, str(tmp_path / "ran")),
        restart="transient",
        backoff=(0.0, 0.0),
    )
    victim = runtime.spawn(tasks.wait_for_cancel, "victim", parent_token=elsewhere)
    assert churner.pid is not None
    assert victim.pid is not None
    try:
        assert ready.wait(DEADLINE)
        pid = churner.pid
        stop_inside_the_lock(pid, random.Random(pid))
        go.cancel()
        while (event := events.get(DEADLINE)).kind != "failed":
            pass
        assert event.description == "flaky"
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(TaskCrashedError, match="SIGKILL"):
            victim.join(DEADLINE)
        assert elsewhere.is_cancelled()
        assert flaky.restarts == 0  # put off: the holder is still stopped
        assert stopped(pid)
    finally:
        if churner.pid is not None:
            os.kill(churner.pid, signal.SIGCONT)
    assert flaky.join(DEADLINE) == "second run"
    assert flaky.restarts == 1
    with pytest.raises(TaskCrashedError, match="stopped"):
        churner.stop(timeout=0)


# ---------------------------------------------------------------- races found in review


@contextmanager
def stopped_holder() -> Iterator[int]:
    """A forked child that takes the arena lock and stops itself; continued and reaped after."""
    arena = Arena.default()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            arena.lock()
            os.kill(os.getpid(), signal.SIGSTOP)
            arena.unlock()
        finally:
            os._exit(0)
    try:
        os.waitid(os.P_PID, pid, os.WSTOPPED)
        assert arena.holder() == pid
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)
        os.waitpid(pid, 0)


def test_a_stale_handle_files_nothing_on_a_stranger() -> None:
    """Test that cancel() through a handle whose node is gone (as a borrowed token can be) files
    no request and sets no PULL on the stranger now in its slot, while the lock is busy."""
    gone = CancellationToken()
    stale = CancellationToken._from_slot(gone._arena, gone._slot, gone._live, 0)  # borrowed
    del gone
    stranger = CancellationToken()
    child = stranger.child_token()
    assert stranger._slot == stale._slot
    with stopped_holder():
        stale.cancel("stale")
        assert stale.is_cancelled()
        for token in (stranger, child):
            assert token._words[token._word] == token._live  # no PULL: the fast path
            assert not token.is_cancelled()
        assert Arena.default().words[_H_REQUESTS] == 0


def test_a_waiter_between_its_look_and_its_sleep_is_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that a waiter on a word that already reads PULL, preempted between finding itself
    not cancelled and going to sleep, still wakes when a request then covers it."""
    token = CancellationToken()
    futex_or_wake(token._arena.address + token._word * 4, PULL_BIT)  # a stray PULL
    looked, resume = threading.Event(), threading.Event()
    real = Arena.pulled
    calls = []

    def pulled(self: Arena, slot: int, live: int) -> tuple[bool, str | None]:
        answer = real(self, slot, live)
        if threading.current_thread().name == "waiter":
            calls.append(answer)
            if len(calls) == 2:  # the first is wait()'s is_cancelled(); the second its loop's
                looked.set()
                resume.wait(DEADLINE)  # "preempted" here, after the answer "not cancelled"
        return answer

    monkeypatch.setattr(Arena, "pulled", pulled)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(token.wait(2 * DEADLINE)), name="waiter")
    with stopped_holder() as holder:
        waiter.start()
        assert looked.wait(DEADLINE)
        token.cancel("covered")  # a request: the word, PULL already set, does not change
        resume.set()
        waiter.join(DEADLINE)
        assert woke == [True]
        assert calls[1] == (False, None)
        assert stopped(holder)
    assert token.cause == "covered"


def test_a_pull_walk_is_not_led_astray_by_a_node_freed_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that the request's walk, preempted on a node that a running lock holder then frees
    (its next link then leads into the free list), still reaches the node's later siblings."""
    parent = CancellationToken()
    later = parent.child_token()  # parent's list: [freed, later] once the holder makes freed
    to_holder_r, to_holder_w = os.pipe()
    to_main_r, to_main_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(to_holder_w)  # so that the parent closing its copy is EOF here
            os.close(to_main_r)
            arena = Arena.default()
            mine = [parent.child_token()]
            arena.lock()
            os.write(to_main_w, str(mine[0]._slot).encode().ljust(16))  # with the lock held
            real_release = Arena._release

            def release(self: Arena, slot: int) -> None:
                select.select([to_holder_r], [], [], DEADLINE)
                os.read(to_holder_r, 1)  # the walk has just pulled the node
                real_release(self, slot)
                os.write(to_main_w, b"R")
                select.select([to_holder_r], [], [], DEADLINE)
                os.read(to_holder_r, 1)  # hold the lock until cancel() returned (or EOF)

            Arena._release = release  # type: ignore[method-assign]
            mine.clear()  # queued: the lock is ours; released as unlock() drains it
            arena.unlock()
        finally:
            os._exit(0)
    try:
        assert select.select([to_main_r], [], [], DEADLINE)[0]
        freed = int(os.read(to_main_r, 16))
        address = Arena.default().address + freed * _arena.SLOT_WORDS * 4
        real_or = futex_or_wake

        def or_wake(at: int, bit: int) -> None:
            real_or(at, bit)
            if at == address and not freeing.is_set():
                freeing.set()
                os.write(to_holder_w, b"g")  # let the holder free it now
                assert select.select([to_main_r], [], [], DEADLINE)[0]
                assert os.read(to_main_r, 1) == b"R"

        freeing = threading.Event()
        monkeypatch.setattr(_arena, "futex_or_wake", or_wake)
        monkeypatch.setattr(_arena, "PATIENCE", 0.0)  # file a request at once
        parent.cancel("walked")
        assert freeing.is_set()
        assert later.is_cancelled()  # while the holder still holds the lock
        assert Arena.default().holder() == pid
        os.write(to_holder_w, b"g")
    finally:
        os.close(to_holder_w)  # EOF: a holder still waiting for us goes on
        os.waitpid(pid, 0)
        for fd in (to_holder_r, to_main_r, to_main_w):
            os.close(fd)
    assert later.cause == "walked"
