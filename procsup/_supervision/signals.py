"""SIGINT and SIGTERM for a supervisor: the first cancels the root token, the second shuts down.

::

    main thread                          "procsup-signals" thread (one per installation)
    ───────────                          ───────────────────────────────────────────────
    SIGINT/SIGTERM arrives
    _handler(): one os.write of the       blocked in os.read(pipe)
      signal number to a non-blocking ──▶ 1st signal: root.cancel("received SIGTERM (signal 15)")
      pipe; nothing else                  2nd signal: supervisor.shutdown(short grace)
                                          EOF (uninstall) ─▶ return

Things that don't work
----------------------
- Cancelling in the handler: Python runs handlers in the main thread between two bytecodes, possibly
  while that thread holds the token arena's lock (a ``threading.Lock``); ``cancel()`` there would
  wait for it forever. The handler only writes one byte; the cancel runs on another thread.
- ``signal.set_wakeup_fd``: there is one per process, and asyncio (or the user) may own it.
- Restoring the previous handlers from any thread: ``signal.signal`` works in the main thread only,
  so a shutdown on the signals thread leaves the handlers in place until the main thread uninstalls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol

from procsup._os.proc import signal_name
from procsup._token.token import CancellationToken

__all__ = ["SignalBridge", "Stoppable"]

logger = logging.getLogger("procsup")

SECOND_SIGNAL_GRACE = 1.0  # seconds tasks get after the second signal, before SIGTERM


class Stoppable(Protocol):
    """What the signals act on: a supervisor's root token, its grace period and its shutdown."""

    @property
    def token(self) -> CancellationToken: ...

    @property
    def grace_period(self) -> float: ...

    def shutdown(self, timeout: float) -> None: ...


class SignalBridge:
    """Handlers for ``signals`` that hand every signal to a thread acting on ``supervisor``.

    Invariants: ``_write`` stays open while our handlers are installed (a handler never writes to
    a closed or reused fd); ``count`` is the number of signals acted on.
    """

    def __init__(self, supervisor: Stoppable, signals: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers() must be called from the main thread")
        self._supervisor = supervisor
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write, False)
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._run, name="procsup-signals", daemon=True)
        self._thread.start()
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # a full pipe already holds enough signals
            os.write(self._write, bytes([signum]))

    def _run(self) -> None:
        while True:
            data = os.read(self._read, 64)
            if not data:
                os.close(self._read)
                return
            for signum in data:
                self.count += 1
                what = f"{signal_name(signum)} (signal {signum})"
                sup = self._supervisor
                try:
                    if self.count == 1:
                        sup.token.cancel(f"Supervisor received {what}")
                    elif self.count == 2:
                        sup.shutdown(min(SECOND_SIGNAL_GRACE, sup.grace_period))
                except Exception:  # logged; this thread must live on to read later signals
                    action = "cancel the root token" if self.count == 1 else "shut down"
                    logger.exception("procsup could not %s on %s", action, what)

    def uninstall(self) -> bool:
        """Restore the previous handlers and stop the thread; False if not on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._write >= 0:
            os.close(self._write)  # the thread reads EOF and returns
            self._write = -1
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        return True
