"""The fork start method's shim: a subreaper between the supervisor and each fork task.

::

    supervisor                      shim (a fork of the supervisor)     task (a fork of the shim)
    ──────────                      ───────────────────────────────     ─────────────────────────
    ForkProcess.start(), every      a subreaper; every signal blocked
    signal blocked across fork:
      os.fork() ──────────────────▶ fork_copy() ──────────────────────▶ signals as they were,
      pid ◀──── status pipe ─────── the task's pid                        PR_SET_PDEATHSIG (dies
                                    close every fd but the status pipe    with the shim), then
                                                                          the target, _exit
      sentinel = the status pipe    wait4 ◀──────────── SIGCHLD ───────── ✝
      (readable once reported) ◀─── raw status + rusage (as the zygote's)
                                    orphans of the task reparent here, setsid() ones included:
                                      SIGKILLed (trees and all) after the grace period
                                    no child left: exit
    Monitor: waitpid(shim) once its pidfd says it exited; shutdown() kills what it still holds
    zygote (guardian): watches the shim's pidfd; if the supervisor dies, it cancels the task's
      token, waits the grace period, SIGTERMs the shim's tree (the shim blocks it, the task need
      not), then kills that tree, the task and its orphans with it

A task started with fork is a copy of the supervisor, so it has to be forked from it (or from a
copy of it): the zygote cannot be its parent. The shim is that copy, and it stays the task's
parent, a subreaper, until the task and everything it left behind is gone. So a fork task's
orphans are contained exactly as a zygote task's are (``procsup._process.guardian``, whose
``Guardian`` the shim runs), even when the task dies by a signal or ``os._exit`` and could name
nobody.

Things that don't work
----------------------
- The supervisor as the subreaper: it would adopt the orphans of the user's *other* subprocesses,
  which ``os.wait()`` would then see, and which could not be told apart from the user's own
  children to reap them.
- The task naming its descendants to the guardian as it exits: a task killed by a signal or
  ``os._exit`` names nobody, and a process group or session named by id can be a stranger's once
  the id is reused. Ancestry, which the kernel keeps, needs neither.
- A shim that exits with its task: the task's orphans would go to init. It stays until they are
  dead; the status goes up the pipe the moment the task is reaped, so nothing waits on it.
- Signals reaching the shim: Ctrl-C or a SIGTERM sent to the user's process group would kill it
  and free the task's orphans. Every signal that can be is blocked, from before the fork (a
  thread started in the shim by a user's at-fork hook inherits the mask: if it took SIGCHLD, the
  shim would wait forever); SIGCHLD is taken with ``sigtimedwait``.
- Running nothing of the user's in the shim: it is made by ``os.fork()``, so the user's
  ``os.register_at_fork`` hooks run in it. The task is then the shim's copy (``fork_copy``: the
  C library's fork, as long as no hook started a thread in the shim), so they do not run again:
  CPython's fork handling in the task made a start ~0.6 ms longer here (7.8 against 7.1 ms,
  medians of 57, a loaded 2-core VM); it resets thread records and locks, which a copy of a
  one-thread process that has just been through it does not need. A hook that started a thread
  makes the shim fork the task with ``os.fork()``.
- Forking the task before CPython's fork handling has run in the shim, to save the shim's round
  of it too: the shim is a copy of a process with other threads, and until that handling has run
  the first bytecode it executes may see another thread's request for the GIL, drop it and wait
  forever for a thread it does not have.
"""

from __future__ import annotations

import fcntl
import multiprocessing.process
import multiprocessing.util
import os
import signal
import struct
from collections.abc import Callable
from typing import Any

from procsup._os import proc as _platform
from procsup._os.fds import close_fds_except
from procsup._os.forking import fork_copy
from procsup._process.guardian import Guardian, children

__all__ = ["PID", "serve"]

PID = struct.Struct("i")  # the first thing on the status pipe: the task's pid, or -errno
_WAIT_CAP = 1.0  # seconds the shim waits for SIGCHLD before it looks for exited children anyway


def serve(
    status_w: int,
    grace: float,
    mask: set[int | signal.Signals],
    run: Callable[[Callable[..., Any], tuple[Any, ...]], int],
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> int:
    """In the shim (a fresh ``os.fork()`` of the supervisor, forked with every signal blocked):
    fork the task, which gets the signal ``mask`` back and runs ``run(target, args)``; report its
    pid, then its end, on ``status_w``; kill its orphans after ``grace`` seconds; return once no
    child is left. Never returns in the task."""
    if status_w < 3:  # fds 0-2 are about to become /dev/null
        status_w = fcntl.fcntl(status_w, fcntl.F_DUPFD_CLOEXEC, 3)
    _platform.set_child_subreaper()
    sigchld = signal.getsignal(signal.SIGCHLD)
    if sigchld == signal.SIG_IGN:  # children would be reaped by the kernel, status and all
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    shim = os.getpid()
    try:
        pid = fork_copy()  # CPython's fork handling has just run here: the task is our copy
    except OSError as exc:
        os.write(status_w, PID.pack(-(exc.errno or 1)))
        return 1
    if pid == 0:  # pragma: no cover - the task; it never returns
        code = 1
        try:
            os.close(status_w)
            if sigchld == signal.SIG_IGN:
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _platform.set_parent_death_signal(signal.SIGKILL)  # its thread lives as the shim does
            if os.getppid() == shim:
                multiprocessing.process._children = set()  # type: ignore[attr-defined]
                multiprocessing.util._run_after_forkers()  # type: ignore[attr-defined]
                code = run(target, args)
        finally:
            os._exit(code)
    # The supervisor waits for the pid to go on: it comes first, before the tidying.
    os.write(status_w, PID.pack(pid))
    # What the supervisor had open is the task's now (it has its own copies); a pipe read to EOF
    # (the supervisor's stdout, say) must not wait for the shim.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    close_fds_except([status_w])
    guardian = Guardian()
    guardian.add_child(pid, status_w, None, grace)
    while True:
        guardian.reap()
        guardian.kill_due()
        if not children():
            return 0
        # A pending SIGCHLD (blocked, so never lost) ends the wait; the cap is for a thread that
        # unblocked it (a user's at-fork hook may start one here) and took it instead.
        due = guardian.timeout()
        signal.sigtimedwait([signal.SIGCHLD], _WAIT_CAP if due is None else min(due, _WAIT_CAP))
