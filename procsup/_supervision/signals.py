"""SIGINT and SIGTERM for a supervisor: the first cancels the root token, the second shuts down.

::

    main thread                          "procsup-signals" thread (one per installation)
    ───────────                          ───────────────────────────────────────────────
    SIGINT/SIGTERM arrives
    _handler(), live, 1st or 2nd signal:  blocked in os.read(pipe)
      one os.write of its number to a ──▶ 1st signal: root.cancel("received SIGTERM (signal 15)")
      non-blocking pipe; nothing else     2nd signal: supervisor.shutdown(short grace) ─▶ close()
    _handler(), closed or 3rd+ signal:    EOF (close) ─▶ return
      _pass_on(): what the previous
      handler does (call it; SIG_IGN:
      nothing; SIG_DFL: the default
      action, e.g. die of SIGTERM)

    close() (any thread, from shutdown()): stop acting on signals; the handlers pass them on
    uninstall() (main thread): close(), then put back the previous handler where ours still is

After its second signal the bridge has done its job: the third and later go to the handler that
was there before, so a program whose main loop does not watch the root token can still be
interrupted (by default, Ctrl-C raises ``KeyboardInterrupt`` again).

Things that don't work
----------------------
- Cancelling in the handler: Python runs handlers in the main thread between two bytecodes, possibly
  while that thread holds the token arena's lock (a ``threading.Lock``); ``cancel()`` there would
  wait for it forever. The handler only writes one byte; the cancel runs on another thread.
- ``signal.set_wakeup_fd``: there is one per process, and asyncio (or the user) may own it.
- Restoring the previous handlers from any thread: ``signal.signal`` works in the main thread only,
  so a shutdown on another thread (the signals thread after the second signal, a worker) leaves
  our handlers in place. They must not swallow signals then: a closed bridge passes each one on.
- Restoring ``_previous`` blindly: two supervisors shut down in creation order would have the
  first remove the second's live handler, and the second put back the first's dead one. Uninstall
  restores only where its own handler is still current (skipping closed bridges below it);
  elsewhere the chain stays, and a closed bridge in it passes signals through.
- Swallowing every signal after the second: the program could then never be Ctrl-C'd again.
- A plain ``threading.Lock`` for ``_live`` and ``_write``: a handler interrupting the main thread
  inside ``close()`` would wait for that thread forever. An ``RLock`` lets it in; ``close()``
  clears ``_live`` before closing the fd, so the handler sees either a live bridge and an open fd
  or a closed bridge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol, TypeAlias

from procsup._os.proc import signal_name
from procsup._token.token import CancellationToken

__all__ = ["SignalBridge", "Stoppable"]

logger = logging.getLogger("procsup")

SECOND_SIGNAL_GRACE = 1.0  # seconds tasks get after the second signal, before SIGTERM
ACTED_ON = 2  # signals a bridge hands to its thread; later ones go to the previous handler

Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers


class Stoppable(Protocol):
    """What the signals act on: a supervisor's root token, its grace period and its shutdown."""

    @property
    def token(self) -> CancellationToken: ...

    @property
    def grace_period(self) -> float: ...

    def shutdown(self, timeout: float) -> None: ...


class SignalBridge:
    """Handlers for ``signals`` that hand the first two signals to a thread acting on
    ``supervisor``, and pass every other one to the handler that was there before.

    Invariants: ``_live`` is True until ``close()``, and ``_write`` is open exactly while
    ``_live`` is (both change together under ``_lock``, so a handler never writes to a closed or
    reused fd); ``_sent`` is the number of signals the handlers wrote, at most ``ACTED_ON``;
    ``count`` is the number of signals acted on; ``_previous`` keeps, for the bridge's whole life,
    the handler each signal had before (a closed bridge still installed somewhere passes to it);
    ``_installed`` is the one bound method installed, so ``signal.getsignal()`` finds it by ``is``.
    """

    def __init__(self, supervisor: Stoppable, signals: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_signal_handlers() must be called from the main thread")
        self._supervisor = supervisor
        self._read, self._write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write, False)
        self._lock = threading.RLock()  # the main thread may hold it when a handler runs
        self._live = True
        self._sent = 0
        self.count = 0
        self._previous: dict[int, Handler] = {}
        self._installed = self._handler
        self._thread = threading.Thread(target=self._run, name="procsup-signals", daemon=True)
        self._thread.start()
        for signum in signals:
            previous = signal.signal(signum, self._installed)
            # None: a handler not installed from Python, which signal.signal() cannot put back.
            self._previous[signum] = signal.SIG_DFL if previous is None else previous

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran: the handlers pass every signal on."""
        return not self._live

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        with self._lock:
            if self._live and self._sent < ACTED_ON:
                self._sent += 1
                with contextlib.suppress(OSError):  # a full pipe already holds enough signals
                    os.write(self._write, bytes([signum]))
                return
        self._pass_on(signum, frame)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """Do what the previous handler of ``signum`` would have done."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous == signal.SIG_IGN:
            return
        if callable(previous):
            previous(signum, frame)
            return
        # SIG_DFL: the default action (for SIGINT and SIGTERM, the process dies of the signal).
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

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

    def close(self) -> None:
        """Stop acting on signals, from any thread: the handlers, wherever they are still
        installed, pass every signal on; the thread ends. Idempotent."""
        with self._lock:
            self._live = False
            if self._write >= 0:
                os.close(self._write)  # the thread reads EOF and returns
                self._write = -1

    def uninstall(self) -> bool:
        """``close()``; on the main thread, also put back the previous handler of each signal
        whose handler is still ours, and wait for the thread. False if not on the main thread
        (the handlers stay, passing signals on, until the main thread uninstalls). Idempotent."""
        self.close()
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self._previous:
            if signal.getsignal(signum) is self._installed:
                signal.signal(signum, self._restorable(signum))
        self._thread.join(5.0)
        return True

    def _restorable(self, signum: int) -> Handler:
        """The previous handler of ``signum``, past any closed bridges (they only pass it on)."""
        previous = self._previous[signum]
        while isinstance(bridge := getattr(previous, "__self__", None), SignalBridge):
            if not bridge.closed or previous is not bridge._installed:
                break
            previous = bridge._previous.get(signum, signal.SIG_DFL)
        return previous
