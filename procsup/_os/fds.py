"""File descriptors: read what a pipe holds, write all of a buffer, pass fds along a socket.

::

    writer (a task, the zygote)                      reader (the supervision thread, a zygote child)
    ───────────────────────────                      ──────────────────────────────────────────────
    write_all(fd, data): os.write until all is out    pump(fd, sink, budget): non-blocking reads,
      (a memoryview: nothing is copied)                  each chunk to sink(), until EAGAIN (True),
                                                         EOF (False) or ``budget`` chunks (True)
                                                       drain(fd): pump into nothing (a wake-up pipe)
                                                       read_exactly(fd, n): blocking, short at EOF
    send_fds(sock, data, fds) ── one datagram ──────▶ recv_fds(sock): (data, fds), at most MAX_FDS
      (AF_UNIX SOCK_SEQPACKET; the fds ride along       fds and MAX_MESSAGE bytes
       as SCM_RIGHTS and arrive as new fd numbers)
    wait_readable(fds, timeout): which of ``fds`` a poll() finds readable (pidfds, pipes)
    close_fds_except(keep): before an exec, or in a process that keeps only what it is given

Only the standard library: this is the lowest layer.

Things that don't work
----------------------
- Reading a pipe until ``b""`` to drain it: a grandchild holding the write end keeps it open for
  as long as it lives. ``pump`` stops at EAGAIN, and ``budget`` bounds what one chatty pipe costs
  a thread that watches many.
- ``select.select``: it raises ValueError for an fd above 1023, and a zygote with a thousand live
  tasks holds that many. ``wait_readable`` uses ``poll()``.
- ``socket.recv_fds``'s ``flags`` (``MSG_CMSG_CLOEXEC``, say) and ``send_fds``'s ``address``: Python
  3.11 ignores them (python/cpython#107898); nothing here passes them. So received fds are
  inheritable: a process that execs closes what it does not pass on (``close_fds_except``).
- Hand-packing SCM_RIGHTS with ``struct``: ``socket.send_fds`` and ``socket.recv_fds`` do the same
  calls; measured here on a SEQPACKET pair, a send and a receive of 0 or 3 fds with 200 B to 60 KB
  cost the same within 2 us (12-35 us either way), against a ~250 us round trip to the zygote.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "CHUNK",
    "MAX_FDS",
    "MAX_MESSAGE",
    "close_fds_except",
    "drain",
    "pump",
    "read_exactly",
    "recv_fds",
    "send_fds",
    "wait_readable",
    "write_all",
]

CHUNK = 65536  # bytes a read asks for by default: what a pipe holds unless enlarged
MAX_FDS = 250  # fds one message may carry: the kernel's SCM_MAX_FD is 253
MAX_MESSAGE = 1 << 17  # bytes a received datagram may have; the rest of a longer one is lost


def pump(
    fd: int, sink: Callable[[bytes], object], budget: int | None = None, size: int = CHUNK
) -> bool:
    """Read the non-blocking ``fd`` and hand each chunk (at most ``size`` bytes) to ``sink``.

    Reads until the fd would block or, if ``budget`` is not None, until ``budget`` chunks were
    read (0: none). Returns False at end of file (a read of ``b""``, or a connection reset: the
    writer is gone, all it wrote has been handed on), True otherwise. ``sink`` may raise; the
    chunk it was given is then consumed.
    """
    while budget is None or budget > 0:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return True
        except ConnectionResetError:  # a SEQPACKET peer gone with data of ours unread
            return False
        if not data:
            return False
        sink(data)
        if budget is not None:
            budget -= 1
    return True


def _discard(data: bytes) -> None:
    pass


def drain(fd: int) -> None:
    """Read a non-blocking pipe empty (a wake-up pipe: what it held does not matter)."""
    pump(fd, _discard, None, 4096)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to the blocking ``fd``; OSError (EPIPE, say) as ``os.write`` raises."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exactly(fd: int, size: int) -> bytes:
    """Read ``size`` bytes from the blocking ``fd``; fewer only if end of file came first."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` as one datagram with ``fds`` (at most ``MAX_FDS``) riding along.

    The receiver gets its own copies; ours stay open. OSError as ``sendmsg`` raises it.
    """
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendmsg([data])


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one datagram (``b""`` at end of file) and the fds that rode along, in order."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    return data, fds


def wait_readable(fds: Iterable[int], timeout: float | None) -> list[int]:
    """Wait up to ``timeout`` seconds (None: for ever, 0: a poll) until one of ``fds`` is
    readable, or hung up; return each one that is. Empty on timeout."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    # poll() rounds a fraction of a millisecond up, and retries after EINTR (PEP 475).
    return [fd for fd, _ in poller.poll(None if timeout is None else max(0.0, timeout) * 1000)]


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd from 3 up but those in ``keep``."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
