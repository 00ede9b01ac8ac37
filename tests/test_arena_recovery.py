"""Tests that the token arena recovers from a holder killed mid-update, and fails cleanly when
it runs out of slots or cause records.

Each kill test forks a child that takes the arena lock and is SIGKILLed at a chosen step; the
kernel drops its lock, and the next holder must find a consistent tree.
"""

from __future__ import annotations

import gc
import os
import signal
import uuid
from collections.abc import Callable, Iterator

import pytest

from procsup import CancellationToken
from procsup._token import arena as _arena
from procsup._token.arena import (
    _FIRST,
    _FIRST_SLOT,
    _H_DIRTY,
    _H_HIGH,
    _H_OP,
    _H_REQUESTS,
    _NEXT,
    _PREV,
    _REFS,
    SLOT_WORDS,
    Arena,
)
from procsup._token.token import renew


def die_in(method: str, action: Callable[[], object], setup: Callable[[], object] = list) -> None:
    """In a forked child, run ``setup``, then ``action`` with ``Arena.<method>`` made to SIGKILL
    the child when called."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            made = setup()
            original = getattr(Arena, method)

            def die(self: Arena, *args: int) -> object:
                if method == "_cancel_descendants":
                    self.words[_H_DIRTY] = args[0]  # the walk's first step, as the real one
                os.kill(os.getpid(), signal.SIGKILL)
                return original(self, *args)

            setattr(Arena, method, die)
            action()
            del made
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the child was not killed inside the arena"
    assert os.WTERMSIG(status) == signal.SIGKILL


def children(token: CancellationToken) -> list[int]:
    """The slots on ``token``'s list of children, checking every back link on the way."""
    words = token._arena.words
    found, previous = [], 0
    slot = words[token._word + _FIRST]
    while slot:
        assert words[slot * SLOT_WORDS + _PREV] == previous, "a broken back link"
        found.append(slot)
        previous, slot = slot, words[slot * SLOT_WORDS + _NEXT]
    return found


def test_a_link_killed_at_its_commit_point_is_redone() -> None:
    """Test that a child_token() killed after journaling its link is linked by the next holder."""
    parent = CancellationToken()
    kept = [parent.child_token() for _ in range(3)]
    before = children(parent)
    die_in("_redo", parent.child_token)
    other = parent.child_token()  # the next holder redoes the journal, then links its own
    assert parent._arena.words[_H_OP] == 0
    after = children(parent)
    assert after[0] == other._slot
    assert after[-3:] == before
    assert len(after) == len(before) + 2
    leaked = after[1]  # the dead child's node: on the list, never published (refs 0)
    assert parent._arena.words[leaked * SLOT_WORDS + _REFS] == 0
    parent.cancel("linked")
    assert all(t.cause == "linked" for t in [*kept, other])


def test_an_unlink_killed_at_its_commit_point_is_redone() -> None:
    """Test that a dropped token whose unlink was killed half-way is unlinked by the next
    holder, leaving its siblings' list whole."""
    parent = CancellationToken()
    kept = [parent.child_token() for _ in range(2)]

    mine: list[CancellationToken] = []  # a token is released only by the process that made it
    die_in("_redo", lambda: mine.pop(1), lambda: mine.extend(parent.child_token() for _ in "abc"))
    other = parent.child_token()  # the next holder redoes the unlink
    assert parent._arena.words[_H_OP] == 0
    remaining = children(parent)
    # Ours, the dead child's first and third (leaked: it never gave them back), then other.
    assert len(remaining) == 5
    assert remaining[0] == other._slot
    assert {t._slot for t in kept} <= set(remaining)
    parent.cancel("unlinked")
    assert all(t.cause == "unlinked" for t in [*kept, other])


def test_a_cancel_walk_killed_half_way_is_finished() -> None:
    """Test that a cancel() killed as its walk began is finished by the next holder, with the
    cause of the cancelled node."""
    root = CancellationToken()
    level = [root.child_token() for _ in range(3)]
    leaves = [t.child_token() for t in level for _ in range(3)]
    die_in("_cancel_descendants", lambda: root.cancel("half-way"))
    assert root.is_cancelled()  # the node itself was marked before the walk
    CancellationToken()  # the next holder finishes the walk
    assert root._arena.words[_H_DIRTY] == 0
    assert all(t.cause == "half-way" for t in [*level, *leaves])


@pytest.fixture
def small_arena(monkeypatch: pytest.MonkeyPatch) -> Iterator[Arena]:
    """A fresh arena as this process's default, with room for 8 live tokens."""
    fd = os.memfd_create("procsup-tokens-test", os.MFD_CLOEXEC)
    arena = Arena(fd, uuid.uuid4().bytes, create=True)
    monkeypatch.setattr(Arena, "_default", arena)
    monkeypatch.setattr(_arena, "_SLOTS", _FIRST_SLOT + 8)
    yield arena
    gc.collect()  # every token of this arena is gone before its fd is
    os.close(fd)


def test_renew_makes_children_and_gives_back_spent_references(small_arena: Arena) -> None:
    """Test that renew() (an executor worker's per-item step) makes one child of each parent,
    then gives back what the spent tokens held: a spent node kept alive by a child made here
    lives on, one nobody else holds is freed, and a spent handle reads as cancelled once its
    node is gone, and gives nothing back a second time when dropped."""
    root = CancellationToken()
    named, old = root.child_token(), root.child_token()
    ahead, started = renew((root, named), (named, old))
    assert sorted(children(root)) == sorted([named._slot, ahead._slot])
    assert children(named) == [started._slot]
    assert small_arena.words[named._word + _REFS] == 1  # only ``started`` holds it now
    assert old.is_cancelled()
    assert not named.is_cancelled()
    del old, named
    gc.collect()
    assert small_arena.words[root._word + _REFS] == 3  # itself, ahead and named
    root.cancel("done")
    assert started.cause == "done"
    assert ahead.cause == "done"


def test_renew_that_runs_out_of_slots_gives_nothing_back(small_arena: Arena) -> None:
    """Test that a renew() which cannot make every child raises, leaks no slot, and leaves the
    spent tokens holding their references."""
    root = CancellationToken()
    tokens = [root.child_token() for _ in range(6)]
    with pytest.raises(RuntimeError, match="more than 8 live tokens"):
        renew((root, root), (tokens[0],))
    assert small_arena.words[root._word + _REFS] == 7  # itself and its 6 children
    assert not tokens[0].is_cancelled()
    assert sorted(children(root)) == sorted(t._slot for t in tokens)


def test_running_out_of_token_slots(small_arena: Arena) -> None:
    """Test that the ninth live token raises a clear RuntimeError and changes nothing: the tree
    stays whole, and dropping a token makes room again."""
    root = CancellationToken()
    tokens = [root.child_token() for _ in range(7)]
    with pytest.raises(RuntimeError, match="more than 8 live tokens"):
        root.child_token()
    with pytest.raises(RuntimeError, match="more than 8 live tokens"):
        CancellationToken()
    assert sorted(children(root)) == sorted(t._slot for t in tokens)
    assert small_arena.words[root._word + _REFS] == 8  # itself and its 7 children
    tokens.pop()
    gc.collect()
    again = root.child_token()
    root.cancel("full")
    assert again.cause == "full"
    assert all(t.cause == "full" for t in tokens)
    assert small_arena.words[_H_HIGH] == _FIRST_SLOT + 8


def test_running_out_of_cause_records(small_arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that once every cause record is in use, a cancel still cancels, with a cause that
    says its reason was dropped, and that a freed record is used again."""
    monkeypatch.setattr(_arena, "_CAUSES", 4)  # record 0 means none: 3 usable
    tokens = [CancellationToken() for _ in range(5)]
    for index, token in enumerate(tokens):
        token.cancel(f"reason {index}")
    assert [t.cause for t in tokens[:3]] == ["reason 0", "reason 1", "reason 2"]
    assert [t.cause for t in tokens[3:]] == [_arena._LOST_REASON] * 2
    del tokens[0]
    gc.collect()
    again = CancellationToken()
    again.cancel("reused")
    assert again.cause == "reused"


def test_a_holder_killed_clearing_the_requests_word_strands_no_request() -> None:
    """Test that a request filed while a holder carried out others is carried out by the next
    holder, when the first is killed just after clearing the requests word."""
    first, second = CancellationToken(), CancellationToken()
    arena = Arena.default()
    assert arena._file_request(first._slot, first._live, "first")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            cancel = Arena.cancel

            def cancel_and_file(self: Arena, slot: int, reason: str | None) -> None:
                cancel(self, slot, reason)
                # Filed as another process would, while this holder carries the first out.
                self._file_request(second._slot, second._live, "second")

            def die(self: Arena) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            Arena.cancel = cancel_and_file  # type: ignore[method-assign]
            Arena._fence = die  # type: ignore[method-assign]
            arena.settle()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), "the child was not killed while clearing the word"
    assert first.cause == "first"
    assert arena.words[_H_REQUESTS] == 0  # the second request is committed, the word says none
    CancellationToken()  # the next holder
    assert second._words[second._word] & 1, "the second request was stranded"
    assert second.cause == "second"
