"""What the supervisor, its zygote and the zygote's children say to each other.

::

    supervisor (``zygote._Zygote``)            zygote (``server._Server``)          spare or child
    ───────────────────────────────            ───────────────────────────          ──────────────
    one AF_UNIX SOCK_SEQPACKET socket; a request is one datagram, fds as SCM_RIGHTS; in order
    Sync(path, argv, cwd, env) ──────────────▶ take them, drop the spare
                   ◀────────────────────────── Synced()
    Preload(names) ──────────────────────────▶ import them
                   ◀────────────────────────── Preloaded(failed)
    Spawn(preload, payload, ward, fresh, stderr, held, module)
      fds: [status pipe's write end, *task fds, memfd if payload is None]
                   ──────────────────────────▶ the spare's pid, or fork one:
                   ◀────────────────────────── Started(pid) | StartFailed(error)
                                               the same datagram, fds: [*task fds, memfd?]
                                                 ─────────────────────────────▶ the spare:
                                                 the very bytes it received     Spawn, unpickled
                                                                                here as there
                                               (no spare: the forked child has the Spawn)
      fresh: the child unpickles the payload, a FreshStart(command, env, preparation, payload),
             and execs python, which reads a FreshHandoff(preparation, fds, payload) from a memfd
    Guard(shim, ward)  fds: [the shim's pidfd, the token's arena]
                   ──────────────────────────▶ watch the shim (no reply)
    EOF (the supervisor died or closed) ─────▶ the guardian: cancel, grace, SIGTERM, SIGKILL

An ``FdRef`` in a message or a payload is the index of an fd in the message's task fds: those
after its first fd (the status pipe, or the pidfd). ``ZygoteProcess`` makes them while it pickles
(``multiprocessing.reduction.DupFd`` asks the "spawning popen", which it is, for them). A message
is unpickled with ``pickle.loads``: its ``FdRef``s stay indices, and the zygote looks them up. A
task's payload, ``(target, args)``, is unpickled with ``load_payload(data, fds)``: each ``FdRef``
becomes the fd it stands for in that process, so the tokens and Connections in ``args`` rebuild
themselves on it. The zygote never unpickles a payload: it is the task's, with its modules.

Things that don't work
----------------------
- Tuples tagged with a string (``("spawn", ...)``) unpacked by position: a field added at one
  end is read as another at the other, silently.
- A module-global table of the fds an ``FdRef`` means, set around each unpickling: state that
  changes what unpickling returns, which a second unpickling (a nested task start, the guardian
  borrowing a token) clobbers. ``load_payload`` gives each unpickling its own table.
- ``slots=True`` on these dataclasses: on 3.11 a frozen one gets a Python ``__getstate__`` and
  ``__setstate__``, measured here at 1.3 us more to pickle a Spawn (with its Ward and FdRefs)
  and 1.7 us more to unpickle it; without slots a dataclass pickles in C. In a warm process a
  Spawn then costs ~3 us more than the tuple it replaces (4.7 against 1.7 us to pickle, 4.5
  against 1.6 to unpickle); right after a fork it costs far more (see ``server._rehearse``).
- Pickling the request twice, or once more to forward it: the spare gets the datagram the zygote
  got, and each pays one ``pickle.loads`` of the small header; the payload inside is bytes.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FdRef",
    "FreshHandoff",
    "FreshStart",
    "Guard",
    "Passed",
    "Preload",
    "Preloaded",
    "Reply",
    "Request",
    "Spawn",
    "StartFailed",
    "Started",
    "Sync",
    "Synced",
    "Ward",
    "decode_reply",
    "encode_started",
    "load_payload",
]


@dataclass(frozen=True)
class FdRef:
    """The ``index``-th of the task fds that ride along with a message (see the module header).

    ``multiprocessing.reduction.DupFd`` makes one while a ``ZygoteProcess`` pickles; in the
    process it reaches, ``load_payload`` turns it into that fd (``detach()`` returns it).
    """

    index: int

    def __reduce__(self) -> tuple[Any, ...]:
        # By call, not by state: ``load_payload`` swaps the callable for its fd table's lookup.
        return (FdRef, (self.index,))


class Passed:
    """An fd that reached this process with a message, as ``DupFd`` gives one: ``detach()``
    returns it. What an ``FdRef`` unpickles as in ``load_payload``."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


class _PayloadUnpickler(pickle.Unpickler):
    """Unpickles with its own fd table: each ``FdRef`` becomes the fd at its index."""

    def __init__(self, data: bytes, fds: Sequence[int]) -> None:
        super().__init__(io.BytesIO(data))
        self._fds = fds

    def find_class(self, module: str, name: str) -> Any:
        # Called once per distinct global in a pickle (it memoizes them): cheap, and only here.
        found = super().find_class(module, name)
        return self._passed if found is FdRef else found

    def _passed(self, index: int) -> Passed:
        return Passed(self._fds[index])


def load_payload(data: bytes, fds: Sequence[int]) -> Any:
    """Unpickle a task's payload in the process the task fds ``fds`` reached: every ``FdRef(i)``
    in it stands for ``fds[i]``."""
    return _PayloadUnpickler(data, fds).load()


@dataclass(frozen=True)
class Ward:
    """What the zygote needs to answer for a task if the supervisor dies: the grace period, and
    the task's token borrowed (``procsup._token.token.borrow_args``: no reference is taken).

    ``arena`` is the token arena's fd among the task fds; ``key``, ``slot`` and ``live`` name
    the token's node in it."""

    grace: float
    key: bytes
    arena: FdRef
    slot: int
    live: int


# ---------------------------------------------------------------- requests (supervisor -> zygote)


@dataclass(frozen=True)
class Sync:
    """Give the zygote the supervisor's ``sys.path``, ``sys.argv``, working directory and
    environment (``env``, as ``os.environb`` holds it; None: unchanged), as multiprocessing's
    forkserver prepares each child from its parent, and more: a task module may be importable
    only through a new ``sys.path`` entry, a task may read a relative path or its ``sys.argv``,
    and a variable set before ``spawn()`` (``CUDA_VISIBLE_DEVICES``, say) is meant for the task.
    Reply: ``Synced``."""

    path: list[str]
    argv: list[str]
    cwd: str
    env: dict[bytes, bytes] | None = None


@dataclass(frozen=True)
class Preload:
    """Import ``names`` now. Reply: ``Preloaded``."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Spawn:
    """Start a task. Reply: ``Started`` or ``StartFailed``; forwarded as is to the spare.

    Fds: the status pipe's write end (the zygote's to keep), the task fds (what the payload's
    ``FdRef``s index), then a memfd holding the payload if ``payload`` is None (it was bigger
    than a datagram should be).

    Attributes:
        preload: Modules to import first, in the zygote too: procsup's own needs and the
            Supervisor's preload list.
        payload: The pickled ``(target, args)`` (``fresh``: a pickled ``FreshStart``), or None.
        ward: Set if the zygote must cancel the task's token when the supervisor dies.
        fresh: The spawn start method: the child execs a fresh interpreter; never a spare.
        stderr: The task's stderr pipe, made the child's fd 2 before anything is unpickled.
        held: The task fds that are write ends of its pipes to the supervisor (result, stderr,
            logs): the zygote keeps its copies until it has written the task's status, so that
            the task's exit closes none of them (``procsup._supervision.launch``).
        module: The task's own module, imported first by the task; by the zygote only once a
            trial proved it safe there (``procsup._process.trials``).
    """

    preload: tuple[str, ...]
    payload: bytes | None
    ward: Ward | None
    fresh: bool
    stderr: FdRef | None
    held: tuple[FdRef, ...] = ()
    module: str | None = None


@dataclass(frozen=True)
class Guard:
    """Answer for the fork task whose shim (our supervisor's child, not ours) is pid ``shim``.
    Fds: the shim's pidfd, then the task fds (the token's arena). No reply."""

    shim: int
    ward: Ward


Request = Sync | Preload | Spawn | Guard


# ---------------------------------------------------------------- replies (zygote -> supervisor)


@dataclass(frozen=True)
class Synced:
    """``Sync`` is done."""


@dataclass(frozen=True)
class Preloaded:
    """``Preload`` is done; each module that failed to import, with its error."""

    failed: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Started:
    """The task runs as ``pid``, a child of the zygote."""

    pid: int


@dataclass(frozen=True)
class StartFailed:
    """The zygote could not fork the task (``error``: the OSError, as text)."""

    error: str


Reply = Synced | Preloaded | Started | StartFailed

# ``Started``, the reply to nearly every request, is packed by hand: the zygote sends it right
# after a fork, when each page that pickling a dataclass writes is copied first (~40 page faults,
# ~90 us of the zygote's time a start at 8 starts in flight, this 2-core VM). A pickle starts
# with b"\x80", never with this tag.
_STARTED = struct.Struct("=cq")
_STARTED_TAG = b"S"


def encode_started(pid: int) -> bytes:
    """``Started(pid)``, as the zygote sends it."""
    return _STARTED.pack(_STARTED_TAG, pid)


def decode_reply(data: bytes) -> Reply:
    """A reply as the zygote sent it: ``encode_started`` or a pickle."""
    if len(data) == _STARTED.size and data[:1] == _STARTED_TAG:
        return Started(_STARTED.unpack(data)[1])
    reply: Reply = pickle.loads(data)
    return reply


# ---------------------------------------------------------------- spawn: zygote child -> python


@dataclass(frozen=True)
class FreshStart:
    """A ``Spawn(fresh=True)`` payload: what to exec, and what multiprocessing's spawn would
    send its child (``preparation``), beside the task's own pickled ``(target, args)``."""

    command: list[str]  # the interpreter, with this one's -O, -X, -W flags
    env: dict[str, str]
    preparation: dict[str, Any]
    payload: bytes


@dataclass(frozen=True)
class FreshHandoff:
    """What the exec'd interpreter reads from its memfd: the task fds kept their numbers."""

    preparation: dict[str, Any]
    fds: list[int]
    payload: bytes
