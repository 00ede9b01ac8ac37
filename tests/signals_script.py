"""A program for the tests to signal once its supervisors' signal handlers have done their part.

    python -m tests.signals_script SCENARIO

It prints one line per step (flushed: the test's handshake), then blocks in ``time.sleep``:

- ``two``: two supervisors install their handlers and shut down in creation order; then
  "ready True" if the original SIGINT handler is back ("ready False" if not).
- ``thread``: a supervisor installs its handlers and shuts down on a worker thread; "ready".
- ``third``: a supervisor installs its handlers and stays up, "ready"; the first signal prints
  "cancelled <the root token's cause>", the second "shut down" once its shutdown() returned.

A ``KeyboardInterrupt`` prints "interrupted" and the program blocks again (until a SIGTERM ends it,
say). Nothing within ``DEADLINE``: "not interrupted", exit status 1.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from procsup import CancellationToken, Supervisor

DEADLINE = 10.0


def _say(*words: object) -> None:
    print(*words, flush=True)


class _Noisy(Supervisor):
    """Says when shutdown() returns: the second signal's handshake."""

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        super().shutdown(*args, **kwargs)
        _say("shut down")


def _watch(token: CancellationToken) -> None:
    if token.wait(DEADLINE):
        _say("cancelled", token.cause)


def main(scenario: str) -> int:
    if scenario == "two":
        first, second = Supervisor(), Supervisor()
        first.install_signal_handlers()
        second.install_signal_handlers()
        first.shutdown()
        second.shutdown()
        line = f"ready {signal.getsignal(signal.SIGINT) is signal.default_int_handler}"
    elif scenario == "thread":
        sup = Supervisor()
        sup.install_signal_handlers()
        worker = threading.Thread(target=sup.shutdown, name="worker")
        worker.start()
        worker.join(DEADLINE)
        line = "ready"
    else:
        sup = _Noisy()
        sup.install_signal_handlers()
        threading.Thread(target=_watch, args=(sup.token,), name="watch", daemon=True).start()
        line = "ready"
    while True:
        try:  # the test signals once it has read the line: say it inside the try
            _say(line)
            time.sleep(DEADLINE)  # block until a signal interrupts or ends the program
        except KeyboardInterrupt:
            line = "interrupted"
            continue
        _say("not interrupted")
        return 1


if __name__ == "__main__":
    # As an interactive program starts: a shell runs a background job with SIGINT ignored, and
    # the test's process (and so this one) may have been started as one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(main(sys.argv[1]))
