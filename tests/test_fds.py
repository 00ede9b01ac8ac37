"""The fd helpers every layer shares (``procsup._os.fds``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from procsup._os.fds import (
    MAX_FDS,
    drain,
    pump,
    read_exactly,
    recv_fds,
    send_fds,
    wait_readable,
    write_all,
)

DEADLINE = 10.0


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe with a non-blocking read end; both ends closed afterwards (if still open)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(write_end, True)
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def test_pump_reads_until_it_would_block_and_tells_eof_apart(pipe: tuple[int, int]) -> None:
    """Test that pump hands every chunk to the sink, returns True when the pipe is empty but
    open, and False at EOF after handing over what was left."""
    read_end, write_end = pipe
    chunks: list[bytes] = []
    os.write(write_end, b"abc")
    assert pump(read_end, chunks.append) is True
    assert pump(read_end, chunks.append) is True  # nothing there: EAGAIN, no chunk
    os.write(write_end, b"def")
    os.close(write_end)
    assert pump(read_end, chunks.append) is False
    assert chunks == [b"abc", b"def"]


def test_pump_reads_at_most_budget_chunks(pipe: tuple[int, int]) -> None:
    """Test that a budget bounds the reads (0: none) and leaves the rest in the pipe."""
    read_end, write_end = pipe
    chunks: list[bytes] = []
    os.write(write_end, b"x" * 10)
    assert pump(read_end, chunks.append, 0) is True
    assert chunks == []
    assert pump(read_end, chunks.append, 2, size=3) is True
    assert chunks == [b"xxx", b"xxx"]
    os.close(write_end)
    assert pump(read_end, chunks.append, None, size=3) is False
    assert b"".join(chunks) == b"x" * 10


def test_pump_reads_a_seqpacket_socket_one_record_at_a_time() -> None:
    """Test that on a SEQPACKET socket each chunk is one record, and a closed peer is EOF."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setblocking(False)
    records: list[bytes] = []
    with mine:
        with theirs:
            theirs.send(b"one")
            theirs.send(b"two")
            assert pump(mine.fileno(), records.append) is True
        assert pump(mine.fileno(), records.append) is False
    assert records == [b"one", b"two"]


def test_drain_empties_a_pipe(pipe: tuple[int, int]) -> None:
    """Test that drain reads a wake-up pipe empty and returns."""
    read_end, write_end = pipe
    os.write(write_end, b"\0" * 10_000)
    drain(read_end)
    assert wait_readable([read_end], 0) == []


def test_write_all_and_read_exactly_move_more_than_a_pipe_holds() -> None:
    """Test that write_all writes a buffer far bigger than the pipe's, all of it, and that
    read_exactly returns it whole, then a short read at EOF."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    data = os.urandom(3 * 1024 * 1024)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(read_exactly(read_end, len(data))))
    reader.start()
    try:
        write_all(write_end, memoryview(data))
        os.close(write_end)
        reader.join(DEADLINE)
        assert not reader.is_alive()
        assert received == [data]
        assert read_exactly(read_end, 10) == b""  # EOF
    finally:
        os.close(read_end)


def test_send_fds_and_recv_fds_pass_fds_along_one_datagram() -> None:
    """Test that fds ride along a SEQPACKET datagram in order, as new fds on the same files,
    that a datagram may carry none, and that a closed peer reads as b""."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(3)]
    try:
        send_fds(mine, b"hello", [w for _, w in pipes])
        send_fds(mine, b"bare", [])
        data, fds = recv_fds(theirs)
        assert data == b"hello"
        assert len(fds) == 3
        for fd, (read_end, write_end) in zip(fds, pipes, strict=True):
            assert fd != write_end
            assert os.fstat(fd).st_ino == os.fstat(write_end).st_ino
            os.write(fd, b"!")
            os.close(fd)
            assert os.read(read_end, 1) == b"!"
        assert recv_fds(theirs) == (b"bare", [])
        mine.close()
        assert recv_fds(theirs) == (b"", [])
    finally:
        mine.close()
        theirs.close()
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)


def test_recv_fds_takes_max_fds() -> None:
    """Test that a datagram carrying MAX_FDS fds arrives with all of them."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        send_fds(mine, b"many", [null] * MAX_FDS)
        data, fds = recv_fds(theirs)
        for fd in fds:
            os.close(fd)
        assert (data, len(fds)) == (b"many", MAX_FDS)
    finally:
        os.close(null)
        mine.close()
        theirs.close()


def test_wait_readable_reports_what_is_readable_or_nothing_on_timeout(
    pipe: tuple[int, int],
) -> None:
    """Test that wait_readable returns [] on timeout and the readable fds otherwise, a pidfd of
    an exited process among them."""
    read_end, write_end = pipe
    assert wait_readable([read_end], 0.01) == []
    os.write(write_end, b"x")
    assert wait_readable([read_end], DEADLINE) == [read_end]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert wait_readable([pidfd], DEADLINE) == [pidfd]
    finally:
        os.close(pidfd)
        child.wait(DEADLINE)


def test_close_fds_except_keeps_only_stdio_and_what_it_is_told() -> None:
    """Test, in a fresh interpreter, that close_fds_except closes every fd from 3 up but those
    it keeps."""
    code = (
        "import json, os\n"
        "from procsup._os.fds import close_fds_except\n"
        "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]\n"
        "close_fds_except([fds[1], fds[3]])\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "    except OSError:\n"
        "        return False\n"
        "    return True\n"
        "print(json.dumps([[fd for fd in range(256) if is_open(fd)], [fds[1], fds[3]]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    remaining, kept = json.loads(out.stdout)
    assert remaining == [0, 1, 2, *kept]
