"""Items for the executor tests: importable, so they pickle by reference under every start method.

Handshakes travel through tokens given to every worker in ``initargs`` (``remember``): an item
cancels ``SIGNALS[i]`` to say "I got here", and waits on one to be let go. Every wait has a
deadline (``DEADLINE``): a test that goes wrong fails, never hangs.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import subprocess
import threading
import time
from typing import Any

from procsup import CancellationToken, current_token

DEADLINE = 30.0

SIGNALS: tuple[CancellationToken, ...] = ()
STATE: dict[str, Any] = {}


class Unpicklable:
    """A return value that cannot be pickled."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


class UnpicklableError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class Custom(Exception):
    """An exception whose constructor takes two arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code


# ---------------------------------------------------------------- initializers


def remember(*tokens: CancellationToken) -> None:
    """Initializer: keep the test's handshake tokens."""
    global SIGNALS
    SIGNALS = tokens


def set_state(key: str, value: Any) -> None:
    """Initializer: set a worker global that items read."""
    STATE[key] = value


def failing_init(message: str) -> None:
    raise ValueError(message)


def crashing_init() -> None:
    _no_core()
    ctypes.string_at(0)


def _no_core() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# ---------------------------------------------------------------- plain items


def pid() -> int:
    return os.getpid()


def mul(x: int, y: int = 1) -> int:
    return x * y


def identity(value: Any) -> Any:
    return value


def get_state(key: str) -> Any:
    return STATE.get(key)


def divide(x: int, y: int) -> float:
    return x / y


def token_state() -> tuple[bool, str | None]:
    token = current_token()
    return token.is_cancelled(), token.cause


def token_id() -> tuple[int, int]:
    """Something that tells one item's token from another's (its node)."""
    from procsup._token.token import node

    return node(current_token())


def allocate(size: int) -> int:
    return len(bytearray(size))


def leave_children() -> list[int]:
    """Start two processes that outlive this item (one in a session of its own); their pids."""
    procs = [
        subprocess.Popen(["sleep", str(4 * DEADLINE)], start_new_session=session)
        for session in (False, True)
    ]
    STATE.setdefault("children", []).extend(procs)  # no ResourceWarning: still referenced
    return [proc.pid for proc in procs]


async def async_double(x: int) -> int:
    import asyncio

    await asyncio.sleep(0)
    return 2 * x


# ---------------------------------------------------------------- outcomes


def raise_custom(code: int) -> None:
    raise Custom(code, "custom failure")


def raise_chained() -> None:
    table: dict[str, int] = {}
    try:
        table["missing"]
    except KeyError as exc:
        raise ValueError("lookup failed") from exc


def system_exit(code: int | None) -> None:
    raise SystemExit(code)


def keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def unpicklable_return() -> Unpicklable:
    return Unpicklable()


def unpicklable_error() -> None:
    raise UnpicklableError("cannot cross")


def sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault() -> None:
    _no_core()
    ctypes.string_at(0)


def abort() -> None:
    _no_core()
    os.abort()


def hard_exit(code: int) -> None:
    os._exit(code)


def fork_then(how: str) -> tuple[str, int]:
    """Fork; the child leaves by ``how`` ("return", "raise", or the code of a sys.exit()), not by
    os._exit, as careless code does; the parent returns how the child ended (killed if it has not
    ended within the deadline)."""
    pid = os.fork()
    if pid == 0:
        if how == "return":
            return ("child", -1)
        if how == "raise":
            raise ValueError("raised in the forked child")
        raise SystemExit(int(how))
    fd = os.pidfd_open(pid)
    try:
        if not select.select([fd], [], [], DEADLINE)[0]:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return ("parent", os.waitstatus_to_exitcode(status))


# ---------------------------------------------------------------- handshakes


def arrive(index: int) -> int:
    """Say "I got here" on ``SIGNALS[index]``, its cause this worker's pid; return the pid."""
    SIGNALS[index].cancel(str(os.getpid()))
    return os.getpid()


def arrive_then_wait(index: int, gate: int, value: Any = None) -> Any:
    """Say "I got here", then wait for ``SIGNALS[gate]``; return ``value``."""
    arrive(index)
    if not SIGNALS[gate].wait(DEADLINE):
        raise TimeoutError("the test never opened the gate")
    return value


def arrive_then_report_token(index: int, gate: int) -> tuple[bool, str | None]:
    """Say "I got here", wait for ``SIGNALS[gate]``; return this item's token state then."""
    arrive_then_wait(index, gate)
    return token_state()


def arrive_then_wait_for_cancel(index: int, saw: int) -> str:
    """Say "I got here", wait until this item's token is cancelled, report its cause on
    ``SIGNALS[saw]``, return normally."""
    arrive(index)
    token = current_token()
    if not token.wait(DEADLINE):
        return "never cancelled"
    SIGNALS[saw].cancel(token.cause)
    return "saw the cancellation"


def arrive_then_ignore_cancel(index: int) -> None:
    """Say "I got here", then run on whatever happens to the token: only a kill ends it."""
    arrive(index)
    time.sleep(DEADLINE)


def step(index: int, blocks: int) -> Any:
    """For map: say "I got here"; item number ``blocks`` then waits to be cancelled."""
    if index == blocks:
        return arrive_then_wait_for_cancel(index, index + 1)
    return arrive(index)


def wait_for_cancel() -> str:
    """Wait until this item's token is cancelled (a timeout), then return."""
    return "cancelled" if current_token().wait(DEADLINE) else "never cancelled"


def fail_when_cancelled() -> None:
    """Wait until this item's token is cancelled, then raise."""
    current_token().wait(DEADLINE)
    raise RuntimeError("stopped: " + str(current_token().cause))


def ignore_cancel() -> None:
    """Run on whatever happens to the token: only a kill ends it."""
    time.sleep(DEADLINE)
