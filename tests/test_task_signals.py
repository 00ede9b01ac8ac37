"""Signal policy inside tasks: nothing inherited from the parent's handlers survives the start."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from types import FrameType

import pytest

from procsup import Supervisor, TaskCrashedError
from tests import tasks

DEADLINE = 10.0


@pytest.fixture
def parent_sigterm_handler() -> Iterator[list[int]]:
    """A Python SIGTERM handler in the supervisor process, as daemons install (restored after)."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield seen
    signal.signal(signal.SIGTERM, previous)


def test_stop_terminates_despite_a_parent_sigterm_handler(
    runtime: Supervisor,
    pipe: Callable[[], tuple[Connection, Connection]],
    parent_sigterm_handler: list[int],
) -> None:
    """Test that SIGTERM from stop() ends a task even if the parent handles SIGTERM (fork)."""
    reader, writer = pipe()
    handle = runtime.spawn(tasks.ignore_cancel, "stubborn", args=(writer,))
    assert reader.poll(DEADLINE)
    reader.recv()
    with pytest.raises(TaskCrashedError) as info:
        handle.stop(timeout=0)
    assert info.value.signal == "SIGTERM"
    assert parent_sigterm_handler == []  # the task's SIGTERM never reached the parent's handler
