"""The exception family, exit-code text and the outcome codec, without starting processes."""

from __future__ import annotations

import pickle
import signal
import threading
import traceback

import pytest

import procsup
from procsup import (
    CriticalTaskError,
    NotDetachedError,
    RemoteTraceback,
    TaskCrashedError,
    TaskFailedError,
    TaskPanickedError,
)
from procsup._os import proc as _platform
from procsup._outcome import remote as _remote

ERRORS = [
    CriticalTaskError("Critical task monitor was cancelled", description="d", pid=1),
    TaskFailedError("failed", description="d", pid=2, exitcode=0, remote_traceback="tb"),
    TaskPanickedError("panicked", description="d", pid=3, exitcode=0, remote_traceback="tb"),
    TaskCrashedError("crashed", description="d", pid=4, exitcode=-9, signal="SIGKILL"),
    TaskCrashedError("stopped", description="d", pid=5, signal="SIGTERM", stopped=True),
    NotDetachedError("Critical task was not detached prior to drop!", description="d", pid=6),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(error: CriticalTaskError) -> None:
    """Test that each error pickles with its type, message and attributes, under procsup's name."""
    error.add_note("a note")
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert vars(clone) == vars(error)
    assert clone.__notes__ == ["a note"]
    assert type(error).__module__ == "procsup"
    assert isinstance(error, CriticalTaskError)
    assert getattr(procsup, type(error).__name__) is type(error)


def test_exception_group_of_errors_pickles() -> None:
    """Test that an ExceptionGroup of procsup errors pickles like any other."""
    group = ExceptionGroup("tasks failed", ERRORS[1:4])
    clone = pickle.loads(pickle.dumps(group))
    assert [type(e) for e in clone.exceptions] == [type(e) for e in group.exceptions]
    assert [vars(e) for e in clone.exceptions] == [vars(e) for e in group.exceptions]


def test_outcome_classes_are_distinct() -> None:
    """Test that a panic is not a failure: except TaskFailedError does not swallow panics."""
    assert not issubclass(TaskPanickedError, TaskFailedError)
    assert not issubclass(TaskCrashedError, TaskFailedError)


def test_remote_traceback_shows_the_child_text() -> None:
    """Test RemoteTraceback's str and pickling."""
    remote = RemoteTraceback("mod.Err", "boom", "Traceback (most recent call last):\n  ...\n")
    assert str(remote).startswith('mod.Err: boom\n"""\nTraceback')
    clone = pickle.loads(pickle.dumps(remote))
    assert (clone.type_name, clone.message, clone.text) == ("mod.Err", "boom", remote.text)


@pytest.mark.parametrize(
    ("exitcode", "text", "name"),
    [
        (-9, "killed by SIGKILL (signal 9): out of memory or killed externally", "SIGKILL"),
        (-11, "killed by SIGSEGV (signal 11): invalid memory access", "SIGSEGV"),
        (-6, "killed by SIGABRT (signal 6): aborted", "SIGABRT"),
        (-signal.SIGRTMIN - 2, "killed by SIGRTMIN+2", "SIGRTMIN+2"),
        (0, "exited with code 0 before reporting a result", None),
        (3, "exited with code 3 without reporting a result", None),
    ],
)
def test_describe_exit(exitcode: int, text: str, name: str | None) -> None:
    """Test that exit statuses name the signal and its likely cause."""
    described, signame = _platform.describe_exit(exitcode)
    assert described.startswith(text)
    assert signame == name


class BustedInit(Exception):
    """Replays badly with plain pickle: __init__ takes other arguments than it passes up."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")
        self.a = a


def _raise_and_catch(exc: BaseException) -> BaseException:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise exc from inner
    except BaseException as caught:
        return caught


def _roundtrip(exc: BaseException) -> _remote.ErrorReport:
    reader = _remote.FrameReader()
    frame = _remote.encode_error(exc)
    for i in range(len(frame)):  # byte by byte: the parser must be incremental
        done = reader.feed(frame[i : i + 1])
        assert done == (i == len(frame) - 1)
    assert reader.body is not None
    report = _remote.decode(reader.body)
    assert isinstance(report, _remote.ErrorReport)
    return report


def test_rebuild_keeps_traceback_chain_and_busted_init() -> None:
    """Test that tblib rebuilds the traceback and cause, even for a class plain pickle breaks on."""
    report = _roundtrip(_raise_and_catch(BustedInit(1, 2)))
    assert not report.panicked
    assert report.short_name == "BustedInit"
    rebuilt = _remote.rebuild(report)
    assert isinstance(rebuilt, BustedInit)
    assert (str(rebuilt), rebuilt.a) == ("1+2", 1)
    assert isinstance(rebuilt.__cause__, KeyError)
    text = "".join(traceback.format_exception(rebuilt))
    assert "_raise_and_catch" in text
    assert "KeyError: 'inner'" in report.text


def test_rebuild_exception_group_members() -> None:
    """Test that an ExceptionGroup raised by a task comes back with its members' tracebacks."""
    member_error = ValueError("v")
    _raise_and_catch(member_error)
    group = _raise_and_catch(ExceptionGroup("many", [member_error]))
    rebuilt = _remote.rebuild(_roundtrip(group))
    assert isinstance(rebuilt, ExceptionGroup)
    (member,) = rebuilt.exceptions
    assert isinstance(member, ValueError)
    assert member.__traceback__ is not None


def test_unpicklable_exception_falls_back_to_text() -> None:
    """Test that an exception that cannot pickle arrives as a RemoteTraceback with the text."""

    class Local(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()  # cannot be pickled, not even by value

    report = _roundtrip(_raise_and_catch(Local("cannot be pickled")))
    rebuilt = _remote.rebuild(report)
    assert isinstance(rebuilt, RemoteTraceback)
    assert "Local" in rebuilt.type_name
    assert "_raise_and_catch" in rebuilt.text


def test_local_exception_class_goes_by_value() -> None:
    """Test that an exception whose class cannot be named by reference (a local class, one of
    the parent's ``__main__``) is pickled by value, traceback included, and comes back as an
    instance of the class it was raised as."""

    class Local(Exception):
        pass

    report = _roundtrip(_raise_and_catch(Local("by value")))
    rebuilt = _remote.rebuild(report)
    assert type(rebuilt) is Local
    assert str(rebuilt) == "by value"
    assert rebuilt.__traceback__ is not None


def test_panic_flag() -> None:
    """Test that BaseExceptions that are not Exceptions are reported as panics."""
    assert _roundtrip(_raise_and_catch(KeyboardInterrupt())).panicked
    assert not _roundtrip(_raise_and_catch(ValueError())).panicked


def test_return_frame_and_undecodable_value() -> None:
    """Test return frames, and that a value the parent cannot unpickle becomes an error report."""
    reader = _remote.FrameReader()
    assert reader.feed(_remote.encode_return({"x": 1}))
    assert reader.body is not None
    assert _remote.decode(reader.body) == _remote.Returned({"x": 1})
    bogus = b"R" + pickle.dumps(1)[:-2]  # truncated pickle
    report = _remote.decode(bogus)
    assert isinstance(report, _remote.ErrorReport)
    assert "could not be unpickled in the parent" in report.message


def test_malformed_frames_decode_to_error_reports() -> None:
    """Test that no frame can make decode() raise (it runs on the supervisor thread)."""
    for body in (b"X", b"E" + pickle.dumps("not a report"), b"E\x80garbage"):
        report = _remote.decode(body)
        assert isinstance(report, _remote.ErrorReport)
        assert "could not be unpickled in the parent" in report.message
