"""The zygote process itself: a preloaded, single-threaded server that forks tasks on request.

Its supervisor-side counterpart, the protocol picture and what was tried first are in
``procsup._zygote``; what it does for tasks whose supervisor died is in ``procsup._guardian``.
Started as ``python -c "import procsup._zygote_main as z; z.serve()" FD``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
from typing import Any

from procsup import _platform
from procsup._guardian import Guardian
from procsup._token import borrowed
from procsup._zygote import MAX_FDS, inherited, run_target

__all__ = ["serve"]


def serve() -> None:
    """Zygote main loop: fork a child per request, report each child's exit on its status pipe,
    and guard every task (``procsup._guardian``) until the supervisor's socket closes."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    _platform.set_child_subreaper()  # a dead task's descendants come to us, not to init
    guardian = Guardian()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the supervisor to handle
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select(guardian.timeout()):
            if key.fileobj is sock:
                own = (sock.fileno(), wake_r, wake_w, selector.fileno())
                pidfd = _serve_request(sock, guardian, own)
                if pidfd is None:
                    selector.unregister(sock)
                    guardian.supervisor_gone(wake_r)
                    return
                if pidfd >= 0:
                    selector.register(pidfd, selectors.EVENT_READ)
            elif key.fileobj == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
            else:
                assert isinstance(key.fileobj, int)
                selector.unregister(key.fileobj)
                guardian.watched_exited(key.fileobj)
        guardian.reap()
        guardian.kill_due()


def _unpickle_and_run(payload: bytes) -> None:
    target, args = pickle.loads(payload)
    del payload
    target(*args)


_FRESH_MAIN = (
    "import sys; sys.path[:0] = sys.argv[2:]; "
    "import procsup._zygote_main as z; z.fresh_main(int(sys.argv[1]))"
)


def _exec_fresh(payload: bytes, fds: list[int]) -> None:
    """In a zygote child, for the spawn start method: exec a fresh interpreter that runs
    ``fresh_main``, keeping only stdio, the task's fds (same numbers) and a memfd with the rest."""
    executable, env, preparation, payload = pickle.loads(payload)
    memfd = os.memfd_create("procsup-spawn", 0)
    os.write(memfd, pickle.dumps((preparation, fds, payload), pickle.HIGHEST_PROTOCOL))
    os.lseek(memfd, 0, os.SEEK_SET)
    keep = sorted({memfd, *fds})
    low = 3
    for fd in keep:
        os.set_inheritable(fd, True)
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    argv = [executable, "-c", _FRESH_MAIN, str(memfd), *preparation.get("sys_path", [])]
    try:
        os.execve(executable, argv, env)
    except OSError as exc:
        print(f"procsup: cannot start {executable!r} for a spawn task: {exc}", file=sys.stderr)
        raise


def fresh_main(fd: int) -> None:
    """A spawn task's interpreter: prepare as multiprocessing's spawn does (``sys.path``, working
    directory, the main module as ``__mp_main__``), then run the task and ``_exit``."""
    with open(fd, "rb") as f:
        preparation, fds, payload = pickle.load(f)
    code = 1
    try:
        inherited[:] = fds
        code = run_target(_prepare_and_run, (preparation, payload))
    finally:
        os._exit(code)


def _prepare_and_run(preparation: dict[str, Any], payload: bytes) -> None:
    import multiprocessing.process
    import multiprocessing.spawn

    process = multiprocessing.process.current_process()
    process._inheriting = True  # type: ignore[attr-defined]
    try:
        multiprocessing.spawn.prepare(preparation)
        target, args = pickle.loads(payload)
    finally:
        del process._inheriting  # type: ignore[attr-defined]
    del payload
    target(*args)


def _borrow(args: Any, fds: list[int]) -> tuple[Any, int]:
    """Unpickle a borrowed token in the zygote. Returns it and the fd its arena came with, or -1
    if the zygote adopted that fd as the arena's (then it is the zygote's to keep)."""
    from procsup._arena import Arena

    inherited[:] = fds
    try:
        token = borrowed(*args)
    finally:
        inherited.clear()
    dup = fds[args[1].index]
    adopted = any(arena.fd == dup for arena in Arena._registry.values())
    return token, -1 if adopted else dup


def _kept_fds() -> set[int]:
    from procsup._arena import Arena

    return {arena.fd for arena in Arena._registry.values()}


def _serve_request(sock: socket.socket, guardian: Guardian, own: tuple[int, ...]) -> int | None:
    """Handle one message: None at EOF, a pidfd to watch, or -1."""
    fds: list[int] = []
    data, ancdata, _, _ = sock.recvmsg(1 << 17, socket.CMSG_SPACE(MAX_FDS * 4))
    if not data:
        return None
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(blob) // 4}i", blob[: len(blob) - len(blob) % 4])
    message = pickle.loads(data)
    if message[0] == "path":
        sys.path[:] = message[1]
        sock.send(pickle.dumps(("ok",)))
        return -1
    if message[0] == "guard":
        _, pid, grace, args = message
        token, spare = _borrow(args, fds[2:])
        if spare >= 0:
            os.close(spare)
        guardian.watch(pid, fds[0], token, grace, fds[1])
        return fds[0]
    _, preload, payload, ward, fresh = message
    for name in preload:
        if name not in sys.modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    status_w, rest = fds[0], fds[1:]
    if payload is None:
        with open(rest[0], "rb") as f:  # closes the memfd
            f.seek(0)  # the offset is shared with the writer's open file description
            payload = f.read()
        rest = rest[1:]
    token, grace, spare = None, 5.0, -1
    if ward is not None:
        grace, args = ward
        token, spare = _borrow(args, rest)
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (status_w, *rest):
            os.close(fd)
        sock.send(pickle.dumps(("error", str(exc))))
        return -1
    if pid == 0:  # pragma: no cover - runs in the task process
        code = 1
        try:
            # Die with the zygote: it is the guardian, and the status pipe would lie otherwise.
            _platform.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != zygote:
                os._exit(code)
            if fresh:
                _exec_fresh(payload, rest)
            # ``spare``: the arena arrived again, but this process maps it already (from us).
            for fd in (*own, status_w, *guardian.fds(), *([spare] if spare >= 0 else [])):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            inherited[:] = rest
            code = run_target(_unpickle_and_run, (payload,))
        finally:
            os._exit(code)
    for fd in rest:
        if fd not in _kept_fds():
            os.close(fd)
    guardian.add_child(pid, status_w, token, grace)
    sock.send(pickle.dumps(("pid", pid)))
    return -1
