"""What the move into layers must not break: pickles name stable paths, old ones still load."""

from __future__ import annotations

import multiprocessing.context
import pickle
import time

import procsup
from procsup import (
    CancellationToken,
    CriticalTaskExecutionHandle,
    EventStream,
    Supervisor,
    TaskCrashedError,
    TaskEvent,
    TaskFailedError,
    TaskSnapshot,
)

# [TaskCrashedError(...), TaskFailedError(...)] pickled by procsup 9b64127, before the move.
OLD_ERRORS = (
    b"\x80\x04\x95s\x01\x00\x00\x00\x00\x00\x00]\x94(\x8c\x07procsup\x94\x8c\x10TaskCrashedErr"
    b"or\x94\x93\x94\x8c,Critical task 'w' crashed: killed by SIGKILL\x94\x85\x94R\x94}\x94(\x8c"
    b"\x0bdescription\x94\x8c\x01w\x94\x8c\x03pid\x94K*\x8c\x08exitcode\x94J\xf7\xff\xff\xff\x8c"
    b"\x06signal\x94\x8c\x07SIGKILL\x94\x8c\x07stopped\x94\x89\x8c\x0bcore_dumped\x94\x89\x8c\x08"
    b"peak_rss\x94N\x8c\twall_time\x94N\x8c\x08cpu_time\x94N\x8c\x0bstderr_tail\x94N\x8c\x11faul"
    b"thandler_dump\x94Nubh\x01\x8c\x0fTaskFailedError\x94\x93\x94\x8c'Critical task 'w' failed:"
    b" ValueError: x\x94\x85\x94R\x94}\x94(h\x08h\th\nK\x07h\x0bN\x8c\x10remote_traceback\x94\x8c"
    b"\rTraceback ...\x94ube."
)


def test_errors_pickled_before_the_move_still_load() -> None:
    """Test that errors pickled by the flat layout load, attributes and all."""
    crashed, failed = pickle.loads(OLD_ERRORS)
    assert isinstance(crashed, TaskCrashedError)
    assert (crashed.description, crashed.pid, crashed.exitcode) == ("w", 42, -9)
    assert crashed.signal == "SIGKILL"
    assert isinstance(failed, TaskFailedError)
    assert failed.remote_traceback == "Traceback ..."


def test_public_classes_are_named_by_their_public_path() -> None:
    """Test that every public class says it lives in procsup (pickles and reprs name that path,
    which does not move with the private modules), and that an event pickles by it."""
    for name in procsup.__all__:
        obj = getattr(procsup, name)
        if isinstance(obj, type):
            assert obj.__module__ == "procsup", name
    for cls in (CriticalTaskExecutionHandle, EventStream, Supervisor, TaskEvent, TaskSnapshot):
        assert getattr(procsup, cls.__name__) is cls
    event = TaskEvent("started", "w", 1, 0, time.time())
    data = pickle.dumps(event)
    assert b"procsup._supervision" not in data
    assert pickle.loads(data) == event


class _Popen:
    """Stands for a process being started: the fd of a token's arena stays this process's."""

    def duplicate_for_child(self, fd: int) -> int:
        return fd

    class DupFd:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def detach(self) -> int:
            return self.fd


def test_a_token_pickles_by_the_name_it_had_before_the_move() -> None:
    """Test that a token pickled for a child names procsup._token._rebuild, as before the move
    (when procsup._token was one module), and that the pickle loads to the same node."""
    token = CancellationToken()
    multiprocessing.context.set_spawning_popen(_Popen())  # type: ignore[arg-type]
    try:
        data = pickle.dumps(token)
    finally:
        multiprocessing.context.set_spawning_popen(None)
    assert b"procsup._token\x94" in data
    assert b"_rebuild" in data
    assert b"procsup._token.token" not in data
    copy = pickle.loads(data)
    assert copy == token
    copy.cancel("through the copy")
    assert token.is_cancelled()
