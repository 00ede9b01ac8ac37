"""The direct channel: a start's request and answer on a socket of their own, not a Ray call.

::

    driver (Channel, one per AgentLink)           agent (Door, one per agent)
    ───────────────────────────────────           ───────────────────────────
                                                  boot: listen on the node's IP, an ephemeral
                                                    port; authkey = os.urandom(32); ready()
                                                    gives both to the driver, through Ray
    start: take an idle connection ─────────────▶ "procsup-agent-door" accepts; a thread per
      (or connect: HMAC challenge both ways,        connection ("procsup-agent-direct"):
      multiprocessing.connection's)                 challenge both ways, then serves its
    send_bytes(pickled StartRequest) ───────────▶   requests one at a time: answer(payload)
    poll(deadline), recv_bytes ◀──────────────────  send_bytes(pickled Started | Refused)
      on the starting thread, then back into
      the pool; any failure: the connection is
      closed and the start goes by Ray instead
    the next request on a connection ───────────▶ acks the answer before it: the driver read it
    close(): every idle connection ─────────────▶ an empty request (goodbye: the last answer
                                                    was read), EOF: its thread ends
                                                  close(): the listener and every connection
                                                    shut down (SHUT_RDWR wakes their threads)

Only the driver that made the agent learns the key (Ray carries it, in ``ready()``'s answer), and
``multiprocessing.connection``'s challenge proves it on each connection before a byte of a
request is read. The channel knows nothing of starts: the agent's ``answer`` gets a request's
bytes and returns the answer's, with a callback for the ack (``procsup._ray.agent`` keeps an
answer the driver may not have read, so that the same start sent again by Ray gets it).

Things that don't work
----------------------
- ``multiprocessing.connection.Listener`` and ``Client`` as they are: ``Client`` connects with no
  timeout (a node gone from the network holds a start for TCP's ~2 minutes of retries), and
  ``Listener.accept()`` runs the challenge on the accepting thread, so one peer that connects and
  says nothing stalls every later connection. The challenge is theirs, run here on the
  connection's own thread, each read and write bounded (``SO_RCVTIMEO``/``SO_SNDTIMEO``).

Invariants: a Channel's ``_idle`` holds connections authenticated, with no request pending,
at most ``_IDLE_KEPT``, none once ``closed``; ``broken`` is None until a connection could not be
opened, then why (no start tries the channel again). A Door's ``_open`` holds every accepted
socket whose thread has not ended; none is accepted once ``_closed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

__all__ = ["Answer", "Channel", "ChannelError", "Door"]

logger = logging.getLogger("procsup.agent")

_HANDSHAKE_DEADLINE = 10.0  # seconds for each read or write of the challenge, either side
_SEND_DEADLINE = 60.0  # seconds a write may block (the peer stopped reading)
_IDLE_KEPT = 4  # idle connections a driver keeps per agent: concurrent starts open more

# answer(request bytes) -> (answer bytes, called once the driver has read the answer, or None)
Answer = Callable[[bytes], tuple[bytes, Callable[[], None] | None]]


class ChannelError(Exception):
    """The channel did not carry a start (no connection, a reset, EOF, no answer in time); the
    agent may or may not have received it."""


def _timeouts(sock: socket.socket, receive: float, send: float) -> None:
    """Bound each blocking read and write of the socket's fd (0: no bound). A
    ``multiprocessing.connection.Connection`` reads with ``os.read``, so ``settimeout`` (which
    makes the fd non-blocking) would not do; a read past its bound raises ``BlockingIOError``."""
    for option, seconds in ((socket.SO_RCVTIMEO, receive), (socket.SO_SNDTIMEO, send)):
        whole = int(seconds)
        sock.setsockopt(
            socket.SOL_SOCKET, option, struct.pack("ll", whole, int((seconds - whole) * 1e6))
        )


class Door:
    """The agent's side: listens on ``host`` and serves each connection on a thread of its own.

    Args:
        host: The node's IP address.
        answer: Called on a connection's thread with each request's bytes.
    """

    def __init__(self, host: str, answer: Answer) -> None:
        self.authkey = os.urandom(32)
        self._answer = answer
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._accepting = threading.Thread(
            target=self._accept, name="procsup-agent-door", daemon=True
        )
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed (shutdown wakes accept() on Linux)
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._open.add(sock)
                thread = threading.Thread(
                    target=self._serve, args=(sock,), name="procsup-agent-direct", daemon=True
                )
                self._threads.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _timeouts(sock, _HANDSHAKE_DEADLINE, _HANDSHAKE_DEADLINE)
            conn = Connection(os.dup(sock.fileno()))  # the socket object stays ours, to shut
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            _timeouts(sock, 0.0, _SEND_DEADLINE)  # between requests, wait as long as it takes
            ack: Callable[[], None] | None = None
            while True:
                try:
                    request = conn.recv_bytes()
                except EOFError:
                    return
                if ack is not None:
                    ack()  # the driver sends a request only once it has read the last answer
                if not request:  # goodbye: the driver closes a connection it is done with
                    return
                reply, ack = self._answer(request)
                conn.send_bytes(reply)
        except (OSError, EOFError, AuthenticationError, AssertionError):
            return  # a reset, a bad key, or the door closing: the driver falls back to Ray
        except Exception:
            # The driver sees EOF and asks again by Ray, whose answer carries the error.
            logger.exception("procsup: a direct start failed on this node")
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                self._open.discard(sock)
                self._threads.discard(threading.current_thread())
            sock.close()

    def close(self, timeout: float) -> bool:
        """Take no connection any more and end every one open (their threads see EOF);
        idempotent. True once the threads have ended within ``timeout`` seconds (0: do not wait);
        a thread in the middle of a start finishes it first."""
        with self._lock:
            self._closed = True
            socks = list(self._open)
            threads = [self._accepting, *self._threads]
        for sock in (self._listener, *socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in threads)


class Channel:
    """The driver's side for one agent: a pool of authenticated connections to its ``Door``.

    Args:
        address: The door's ``(host, port)``.
        authkey: The door's key.
    """

    def __init__(self, address: tuple[str, int], authkey: bytes) -> None:
        self._address = address
        self._authkey = authkey
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self.closed = False
        self.broken: str | None = None

    def call(self, request: bytes, deadline: float) -> bytes:
        """Send ``request`` and return the answer, on this thread, by ``deadline`` (monotonic).

        Raises:
            ChannelError: the channel is closed or broken, or failed now (the connection is
                closed then): the agent may or may not have the request.
        """
        conn = self._take(deadline)
        try:
            conn.send_bytes(request)
            if not conn.poll(max(deadline - time.monotonic(), 0.0)):
                raise ChannelError(f"no answer on the direct channel to {self._address}")
            reply = conn.recv_bytes()
        except ChannelError:
            conn.close()
            raise
        except (OSError, EOFError) as exc:
            conn.close()
            raise ChannelError(f"the direct channel to {self._address} failed: {exc!r}") from exc
        with self._lock:
            if not self.closed and len(self._idle) < _IDLE_KEPT:
                self._idle.append(conn)
                return reply
        _goodbye(conn)
        return reply

    def _take(self, deadline: float) -> Connection:
        with self._lock:
            if self.closed or self.broken is not None:
                raise ChannelError(self.broken or "the direct channel is closed")
            if self._idle:
                return self._idle.pop()
        try:
            return self._connect(deadline)
        except (OSError, EOFError, AuthenticationError, AssertionError) as exc:
            why = f"the direct channel to {self._address} could not be opened: {exc!r}"
            with self._lock:
                self.broken = why  # the door is gone: every start goes by Ray from now on
            raise ChannelError(why) from exc

    def _connect(self, deadline: float) -> Connection:
        wait = min(max(deadline - time.monotonic(), 0.001), _HANDSHAKE_DEADLINE)
        sock = socket.create_connection(self._address, timeout=wait)
        try:
            sock.settimeout(None)  # blocking again; bounded by SO_RCVTIMEO/SO_SNDTIMEO instead
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _timeouts(sock, _HANDSHAKE_DEADLINE, _SEND_DEADLINE)  # poll() bounds the answer
            conn = Connection(sock.detach())
        finally:
            sock.close()
        try:
            answer_challenge(conn, self._authkey)
            deliver_challenge(conn, self._authkey)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the idle connections now, and each busy one as its start returns; idempotent."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            _goodbye(conn)


def _goodbye(conn: Connection) -> None:
    """Close a connection whose last answer was read, saying so: the agent forgets that answer
    (it keeps an answer the driver may have missed, for the start's second copy by Ray)."""
    with contextlib.suppress(OSError):
        conn.send_bytes(b"")
    conn.close()
