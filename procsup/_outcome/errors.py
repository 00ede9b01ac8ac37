"""The exception family: one base class, every member picklable and named after ``procsup``.

Every class pins ``__module__`` to ``"procsup"`` (tracebacks and pickles name the public path, not
the private module) and defines ``__reduce__`` over its message and attributes, so an error crosses
a process boundary intact: a nested critical task can re-raise its sub-task's failure, and an
``ExceptionGroup`` of procsup errors pickles like any other.

Things that don't work
----------------------
- ``BaseException.__reduce__`` with keyword-only attributes: it replays ``cls(*args)`` and loses
  anything ``__init__`` took by keyword unless ``__dict__`` happens to carry it.
- Pickling ``__cause__``: plain pickle drops causes and tracebacks by design; the child-side chain
  crosses the task boundary through ``procsup._outcome.remote`` instead, and ``TaskFailedError``
  keeps the full child traceback as text in ``remote_traceback``, which does survive pickling.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

__all__ = [
    "BrokenExecutorError",
    "CriticalTaskError",
    "NotDetachedError",
    "RemoteTraceback",
    "TaskCrashedError",
    "TaskFailedError",
    "TaskPanickedError",
]


class CriticalTaskError(Exception):
    """Base of every procsup error about a critical task.

    Also raised as is by ``join()`` when the supervisor was lost before the task's outcome was known
    (its thread died, or the interpreter is exiting): "Critical task monitor was cancelled".

    Attributes:
        description: The task's description, or None.
        pid: The task's process id, or None if it never started.
        exitcode: ``Process.exitcode`` once the process has been reaped (``-N`` for signal N), or
            None.
    """

    __module__ = "procsup"

    def __init__(
        self,
        message: str,
        *,
        description: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.description = description
        self.pid = pid
        self.exitcode = exitcode

    @property
    def message(self) -> str:
        """The error's message, as given to the constructor."""
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        # The state dict carries the keyword attributes (and __notes__); BaseException.__setstate__
        # restores them after cls(message) is replayed.
        return (type(self), (self.message,), dict(self.__dict__))

    def __str__(self) -> str:
        return self.message


class _ReportedError(CriticalTaskError):
    """A task outcome the child reported: it carries the child's formatted traceback."""

    def __init__(
        self,
        message: str,
        *,
        description: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message, description=description, pid=pid, exitcode=exitcode)
        self.remote_traceback = remote_traceback


class TaskFailedError(_ReportedError):
    """The task raised an ``Exception``.

    ``str()`` is ``Critical task '<description>' failed: <Type>: <message>``. ``__cause__`` is the
    original exception rebuilt in the parent with its child-side traceback, or a
    :class:`RemoteTraceback` standing in for it when it could not cross the process boundary.

    Attributes:
        remote_traceback: The task's traceback as formatted in the child (chain included), or None.
    """

    __module__ = "procsup"


class TaskPanickedError(_ReportedError):
    """The task raised a ``BaseException`` that is not an ``Exception``.

    ``KeyboardInterrupt``, ``SystemExit`` with a code other than 0/None, ``GeneratorExit``...
    ``str()`` is ``Critical task '<description>' panicked: <Type>: <message>``; ``__cause__`` and
    ``remote_traceback`` as for :class:`TaskFailedError`.
    """

    __module__ = "procsup"


class TaskCrashedError(CriticalTaskError):
    """The task's process died without reporting an outcome, or was stopped on request.

    A crash (signal, ``os._exit``, interpreter abort) has cancelled the parent token; a stop
    (``stop()`` or ``Supervisor.shutdown()`` killing a task that did not honour cancellation in
    time) has not, and says so in the message and in ``stopped``.

    Attributes:
        signal: The name of the signal that killed the process ("SIGKILL"), or None if it exited.
        stopped: True when procsup killed the task because it was asked to stop it.
        core_dumped: True if the kernel dumped a core.
        peak_rss: The process's peak resident set size in bytes, or None if unknown.
        wall_time: Seconds from the start of the process to its reaping, or None.
        cpu_time: User plus system CPU seconds of the process, or None if unknown.
        stderr_tail: The last lines the task wrote to stderr (about 50 lines, 8 KiB at most), or
            None. Also in the error's notes, so a traceback shows them.
        faulthandler_dump: The faulthandler report of a fatal signal (where every thread was), or
            None.
    """

    __module__ = "procsup"

    def __init__(
        self,
        message: str,
        *,
        description: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: str | None = None,
        stopped: bool = False,
        core_dumped: bool = False,
        peak_rss: int | None = None,
        wall_time: float | None = None,
        cpu_time: float | None = None,
        stderr_tail: str | None = None,
        faulthandler_dump: str | None = None,
    ) -> None:
        super().__init__(message, description=description, pid=pid, exitcode=exitcode)
        self.signal = signal
        self.stopped = stopped
        self.core_dumped = core_dumped
        self.peak_rss = peak_rss
        self.wall_time = wall_time
        self.cpu_time = cpu_time
        self.stderr_tail = stderr_tail
        self.faulthandler_dump = faulthandler_dump


class NotDetachedError(CriticalTaskError):
    """A handle was dropped, or its ``with`` block left, without ``join()`` or ``detach()``.

    The seed's ``Drop`` panics here. Python cannot raise from a finalizer, so a dropped handle
    reports this through ``sys.unraisablehook`` (the task keeps running, supervised); leaving a
    ``with`` block raises it.
    """

    __module__ = "procsup"


class BrokenExecutorError(CriticalTaskError, concurrent.futures.BrokenExecutor):
    """A ``procsup.Executor`` can run no more items: a worker's ``initializer`` raised, a worker
    died before it was ready, or no worker could be started.

    A ``concurrent.futures.BrokenExecutor`` (so code written for ``BrokenProcessPool`` catches
    it) and a ``CriticalTaskError``. The message carries the cause; for a failed initializer, its
    traceback as formatted in the worker. Items still waiting fail with it, and so does every
    later ``submit()``; items already running finish.
    """

    __module__ = "procsup"


class RemoteTraceback(Exception):
    """Stand-in for a child exception that could not be rebuilt in the parent.

    Used as ``__cause__`` of a :class:`TaskFailedError` when the original exception (or the return
    value) could not be pickled in the child or unpickled in the parent. ``str()`` shows the
    exception's type, message and the full traceback as formatted in the child.

    Attributes:
        type_name: Qualified name of the original exception's class ("mymod.MyError").
        text: The child-side traceback, formatted as Python prints it.
    """

    __module__ = "procsup"

    def __init__(self, type_name: str, message: str, text: str) -> None:
        super().__init__(type_name, message, text)
        self.type_name = type_name
        self.text = text

    @property
    def message(self) -> str:
        """The original exception's ``str()``."""
        return str(self.args[1])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.text))

    def __str__(self) -> str:
        head = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f'{head}\n"""\n{self.text.rstrip()}\n"""'
