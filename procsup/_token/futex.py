"""Linux futexes on shared memory: the kernel's wait queue, with nothing to unlock.

A futex wait sleeps while a 32-bit word still holds an expected value; a wake rouses the sleepers
on that word. Neither side owns anything, so a process killed while waiting or waking leaves no
state behind: exactly what a kill-safe cancellation flag needs. The words live in a
``MAP_SHARED`` memfd mapping, so these are the shared (not ``FUTEX_PRIVATE``) operations.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

__all__ = ["WAITV_MAX", "futex_add", "futex_or_wake", "futex_wait", "futex_waitv", "futex_wake"]

if not sys.platform.startswith("linux"):  # pragma: no cover - procsup targets Linux
    raise ImportError(f"procsup needs Linux futexes (sys.platform is {sys.platform!r})")

# SYS_futex differs per architecture; these are the kernel's own numbers.
_SYS_FUTEX = {
    "x86_64": 202,
    "aarch64": 98,
    "riscv64": 98,
    "ppc64le": 221,
    "ppc64": 221,
    "s390x": 238,
    "i686": 240,
    "i386": 240,
    "armv7l": 240,
}[platform.machine()]
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX_WAKE_OP = 5
_WAKE_ALL = 0x7FFFFFFF
# FUTEX_WAKE_OP's val3 is (op << 28) | (cmp << 24) | (oparg << 12) | cmparg. The ops used: ADD (1)
# of a 12-bit signed oparg, and OR (2) with FUTEX_OP_OPARG_SHIFT (8), so the operand is
# ``1 << oparg``. The conditional second wake is for ``val2`` = 0 waiters: the first wake, on the
# same word, already woke whoever was to be woken.
_OP_ADD = 1 << 28
_OP_OR_SHIFT = (2 | 8) << 28


_SYS_FUTEX_WAITV = 449  # Linux >= 5.16; one number on every architecture (a newer syscall)
_FUTEX2_SIZE_U32 = 0x02
WAITV_MAX = 128  # the kernel's limit on the words of one futex_waitv


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Waitv(ctypes.Structure):
    _fields_ = (
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


# CDLL (not PyDLL) releases the GIL for the duration of the call.
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def futex_wait(address: int, expected: int, timeout: float | None) -> None:
    """Sleep while the word at ``address`` equals ``expected``, at most ``timeout`` seconds.

    Returns on a wake, a timeout, a signal or a value mismatch alike: callers re-check the word.
    """
    if timeout is None:
        _syscall(_SYS_FUTEX, address, _FUTEX_WAIT, _signed(expected), None, None, 0)
        return
    seconds = int(timeout)
    spec = _Timespec(seconds, int((timeout - seconds) * 1e9))
    _syscall(_SYS_FUTEX, address, _FUTEX_WAIT, _signed(expected), ctypes.addressof(spec), None, 0)


def futex_waitv(words: list[tuple[int, int]]) -> int:
    """Sleep while each word at ``address`` still equals its ``expected`` (``(address, expected)``
    pairs, at most ``WAITV_MAX``), until any of them is woken.

    Returns the index of a woken word, or -1 on a value mismatch or a signal: callers re-check
    the words, as after ``futex_wait``.

    Raises:
        OSError: the kernel has no ``futex_waitv`` (Linux < 5.16: ENOSYS), or refuses the words.
    """
    entries = (_Waitv * len(words))(
        *(_Waitv(exp, addr, _FUTEX2_SIZE_U32, 0) for addr, exp in words)
    )
    woken = _syscall(_SYS_FUTEX_WAITV, ctypes.addressof(entries), len(words), 0, None, None, 0)
    if woken >= 0:
        return int(woken)
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return -1
    raise OSError(err, f"futex_waitv: {os.strerror(err)}")


def futex_wake(address: int) -> None:
    """Wake every process and thread sleeping on the word at ``address``."""
    _syscall(_SYS_FUTEX, address, _FUTEX_WAKE, _WAKE_ALL, None, None, 0)


def futex_or_wake(address: int, bit: int) -> None:
    """Atomically set ``bit`` in the word at ``address``, then wake everybody sleeping on it.

    The kernel does the read-modify-write (``FUTEX_WAKE_OP``), so it cannot lose a store that
    another process makes to the same word at the same time, whatever that process is.
    """
    _wake_op(address, _OP_OR_SHIFT | (bit & 0xFFF) << 12, _WAKE_ALL)


def futex_add(address: int, delta: int, *, wake: bool) -> None:
    """Atomically add ``delta`` (-2048 to 2047) to the word at ``address``; then, if ``wake``,
    wake everybody sleeping on it. Atomic as ``futex_or_wake`` is."""
    _wake_op(address, _OP_ADD | (delta & 0xFFF) << 12, _WAKE_ALL if wake else 0)


def _wake_op(address: int, val3: int, wake: int) -> None:
    _syscall(_SYS_FUTEX, address, _FUTEX_WAKE_OP, wake, None, address, _signed(val3))


def _check() -> None:
    # A cheap self-test at import: a wake with no sleeper must answer 0, not ENOSYS.
    word = ctypes.c_uint32(0)
    if _syscall(_SYS_FUTEX, ctypes.addressof(word), _FUTEX_WAKE, 1, None, None, 0) < 0:
        err = ctypes.get_errno()
        raise ImportError(f"futex syscall unavailable: {os.strerror(err)}")


_check()
