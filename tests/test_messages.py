"""The messages between supervisor, zygote and its children (``procsup._process.messages``)."""

from __future__ import annotations

import multiprocessing.context
import multiprocessing.reduction
import os
import pickle
from multiprocessing.connection import Connection, Pipe
from typing import Any

import pytest

from procsup import CancellationToken
from procsup._process.messages import (
    FdRef,
    FreshHandoff,
    FreshStart,
    Guard,
    Preload,
    Preloaded,
    Spawn,
    Started,
    StartFailed,
    Sync,
    Synced,
    Ward,
    load_payload,
)
from procsup._process.zygote import ZygoteProcess
from procsup._token.token import borrow_args

WARD = Ward(2.5, b"k" * 16, FdRef(0), 3, 5)
MESSAGES = [
    Sync(["/a", "/b"], ["script.py", "-v"], "/tmp"),
    Sync(["/a"], ["script.py"], "/", {b"CUDA_VISIBLE_DEVICES": b"1", b"\xff": b"\xfe"}),
    Synced(),
    Preload(("json", "tests.tasks")),
    Preloaded((("missing", "ModuleNotFoundError: No module named 'missing'"),)),
    Spawn(("tests.tasks",), b"payload", WARD, False, FdRef(1)),
    Spawn(("procsup",), b"payload", None, False, None, (FdRef(2),), "tests.tasks"),
    Spawn((), None, None, True, None),
    Started(1234),
    StartFailed("[Errno 11] Resource temporarily unavailable"),
    Guard(4321, WARD),
    FreshStart(["python", "-O"], {"A": "1"}, {"sys_path": ["/a"]}, b"payload"),
    FreshHandoff({"sys_path": ["/a"]}, [5, 6], b"payload"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_pickling_unchanged(message: object) -> None:
    """Test that each message unpickles (as the zygote and a spare do) to an equal one of the
    same type, its FdRefs still indices."""
    copy = pickle.loads(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
    assert type(copy) is type(message)
    assert copy == message


def _pickle_as_a_start(obj: Any) -> tuple[bytes, list[int]]:
    """Pickle ``obj`` as ``ZygoteProcess.start`` pickles a payload: the fds it names, in order."""
    popen = ZygoteProcess(print, ())
    multiprocessing.context.set_spawning_popen(popen)  # type: ignore[arg-type]
    try:
        data = bytes(multiprocessing.reduction.ForkingPickler.dumps(obj))
    finally:
        multiprocessing.context.set_spawning_popen(None)
    return data, list(popen._fds)


def test_load_payload_turns_each_fdref_into_the_fd_it_stands_for() -> None:
    """Test that a Connection pickled for a start becomes, with load_payload, a Connection on the
    fd at its FdRef's index, for each table it is loaded with (no table is shared)."""
    reader, writer = Pipe(duplex=False)
    data, named = _pickle_as_a_start(writer)
    assert named == [writer.fileno()]
    try:
        for _ in range(2):
            copy = os.dup(writer.fileno())
            rebuilt: Connection = load_payload(data, [copy])  # it owns ``copy`` now
            try:
                assert rebuilt.fileno() == copy
                rebuilt.send("through the copy")
            finally:
                rebuilt.close()
            assert reader.poll(5)
            assert reader.recv() == "through the copy"
    finally:
        reader.close()
        writer.close()


def test_an_fdref_is_an_index_but_in_load_payload() -> None:
    """Test that FdRefs unpickle as themselves with pickle.loads (a message: the zygote looks its
    indices up) and as the fds of the table given to load_payload, each detach() giving one."""
    data = pickle.dumps([FdRef(1), FdRef(0), FdRef(1)], pickle.HIGHEST_PROTOCOL)
    assert pickle.loads(data) == [FdRef(1), FdRef(0), FdRef(1)]
    assert [ref.detach() for ref in load_payload(data, [40, 41])] == [41, 40, 41]


def test_a_ward_names_its_tokens_arena_by_index() -> None:
    """Test that a Ward built from borrow_args names the token's arena as an FdRef into the
    start's fds, one per arena and start, whatever else borrows or pickles a token of it."""
    token = CancellationToken()
    popen = ZygoteProcess(print, ())
    multiprocessing.context.set_spawning_popen(popen)  # type: ignore[arg-type]
    try:
        ward = Ward(1.0, *borrow_args(token, popen))
        again = Ward(1.0, *borrow_args(token.child_token(), popen))
    finally:
        multiprocessing.context.set_spawning_popen(None)
    assert ward.arena == again.arena == FdRef(0)
    assert len(popen._fds) == 1
