"""Child-side entry point: signal policy, run the task, ship its one outcome frame.

::

    supervisor process                               task process (procsup._process.zygote)
    ──────────────────                               ──────────────────────────────
    Process(target=main, args=(fn, args,   ──start──▶ main(): SIGINT ignored, own process group,
            kwargs, writer, token, stderr))                 a subreaper, fd 2 := the stderr pipe
                                                            value = fn(token, *args, **kwargs)
    writer closed right after start                         (an awaitable runs in a fresh loop)
                                                            frame = encode_return / encode_error
    supervisor thread reads the pipe   ◀──── frame ──────  write_all(writer), blocking
    and watches the process itself                          return -> exit code 0

The outcome is decided from the frame, and death from the process: a task that dies before its
frame is complete crashed, whatever it wrote. A zygote's spare runs ``warm()`` while it idles:
the steps of ``main()`` (and of the setup it runs) that do not depend on the task, so that their
first writes to the pages the spare shares with the zygote are not on the start's path. Those
whose result a fork inherits the zygote runs once for all its children (``prepare_zygote()``).

Things that don't work
----------------------
- Letting multiprocessing report the outcome: ``Process._bootstrap`` prints the traceback to stderr
  and exits 1, indistinguishable from ``os._exit(1)``; ``SystemExit(n)`` becomes exit code ``n``.
- ``Connection.send_bytes`` for a big result: it concatenates header and payload for small ones and
  gives no way to stream; a plain ``os.write`` loop over a memoryview copies nothing.
- Handling SIGINT in the task: Ctrl-C at a terminal signals the whole foreground group; the
  supervisor decides (it cancels the tree), so tasks ignore it and also leave that group.
- Keeping what a fork inherits: the parent's Python SIGTERM handler (and asyncio's wake-up fd)
  would swallow the SIGTERM of ``stop()``, leaving only SIGKILL a second later. They are reset.
"""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from procsup._os.fds import write_all
from procsup._os.proc import detach_process_group, leave_if_forked
from procsup._os.tree import enter_task
from procsup._outcome.remote import encode_error, encode_return, encode_value
from procsup._process.logs import prepare_forwarder
from procsup._process.stdio import attach, prepare_stderr
from procsup._token.current import set_current_token
from procsup._token.token import CancellationToken

__all__ = ["main", "prepare_zygote", "warm"]

T = TypeVar("T")


async def _await(aw: Awaitable[T]) -> T:
    return await aw


def _outcome(
    task_fn: Callable[..., Any],
    token: CancellationToken,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> bytes:
    owner = os.getpid()
    try:
        value = task_fn(token, *args, **kwargs)
        if inspect.isawaitable(value):
            import asyncio  # only for async tasks: see procsup._supervision.aio

            value = asyncio.run(_await(value))
    except SystemExit as exc:
        leave_if_forked(owner, exc)
        # sys.exit() and sys.exit(0) are how scripts say "done": a success, as for the interpreter.
        if exc.code not in (0, None):
            return encode_error(exc)
        value = None
    except BaseException as exc:  # noqa: BLE001 - every exception is an outcome, even KeyboardInterrupt
        leave_if_forked(owner, exc)
        return encode_error(exc)
    leave_if_forked(owner, None)
    return encode_value(value, "task")


def _reset_signals() -> None:
    """Drop handlers inherited from the parent (under fork): SIGTERM from stop() must terminate."""
    signal.set_wakeup_fd(-1)  # an inherited asyncio wake-up fd would swallow signals
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        if callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle


def warm(idle: Callable[[], bool]) -> None:
    """In a zygote's spare, before its task is known: what ``main()`` and the setup it runs do
    whatever the task, done while the spare idles. The first write to each page after a fork
    copies it; these steps wrote ~130 pages and took ~0.4 ms on a start's path (this 2-core VM),
    and ``main()`` repeats them at the cost of a warm process (each is idempotent).

    ``idle()`` is asked before each step: once it says False (the task has come), the task does
    the rest itself, rather than wait for it.
    """
    for step in (_reset_signals, enter_task, prepare_stderr, prepare_forwarder, _encode_nothing):
        if not idle():
            return
        step()


# Values a task commonly returns: the zygote checks each as ``_outcome`` does (``isawaitable``
# caches its verdict per type, in ``collections.abc.Awaitable``) and encodes it once.
_COMMON_VALUES: tuple[object, ...] = (None, 0, 0.0, True, "", b"", (), [], {})


def prepare_zygote() -> None:
    """In the zygote, once: the steps of ``main()`` whose result a fork inherits (``sys.stderr``
    and faulthandler on fd 2, the root logger's only handler a ``Forwarder``, the abc caches
    that say a common value is not awaitable), so that its tasks only hand them their fds. Done
    in each task instead, they wrote ~70 pages it shares with the zygote (each copied first) on
    this 2-core VM."""
    prepare_stderr()
    prepare_forwarder()
    for value in _COMMON_VALUES:
        inspect.isawaitable(value)
        encode_return(value)


def _encode_nothing() -> None:
    encode_return(None)


def main(
    task_fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    writer: Connection,
    token: CancellationToken,
    stderr: Connection | None = None,
) -> None:
    """Run ``task_fn(token, *args, **kwargs)`` in this (child) process and report its outcome.

    ``stderr``: the write end of the task's stderr pipe (``procsup._process.stdio``), or None.
    """
    _reset_signals()
    detach_process_group()
    enter_task()  # a subreaper: descendants stay below the task while it lives (procsup._os.tree)
    if stderr is not None:
        attach(stderr)
    set_current_token(token)
    frame = _outcome(task_fn, token, args, kwargs)
    try:
        write_all(writer.fileno(), frame)
    except OSError:
        # EPIPE: the supervisor is gone, nobody is left to tell.
        pass
    finally:
        writer.close()
