"""Task and actor bodies for scripts/bench_ray.py (imported on the cluster's nodes).

No Ray here: the node's zygote imports a task's module before forking it, and every task would
inherit Ray's hundred megabytes of address space (and fork that much slower). The actor class is
made a Ray actor by bench_ray.py.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource
import time

from procsup import CancellationToken


def _say(fifo: str, text: str) -> None:
    with open(fifo, "w") as f:
        f.write(text + "\n")


def _segfault_on_go(go: str, fifo: str) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.disable()  # the same crash on both sides: no dump written on the way down
    fd = os.open(go, os.O_RDONLY)
    _say(fifo, "ready")
    os.read(fd, 1)
    ctypes.string_at(0)


def trivial(token: CancellationToken) -> int:
    return 1


def stamp_on_cancel(token: CancellationToken, fifo: str) -> None:
    """Say ready, block until cancelled, then say when we woke (CLOCK_MONOTONIC)."""
    _say(fifo, "ready")
    token.wait(60.0)
    _say(fifo, repr(time.monotonic()))


def segfault_on_go(token: CancellationToken, go: str, fifo: str) -> None:
    _segfault_on_go(go, fifo)


class Echo:
    """The floors: a warm actor's round trip, and an actor dying of the same crash."""

    def ping(self) -> int:
        return 1

    def segfault_on_go(self, go: str, fifo: str) -> None:
        _segfault_on_go(go, fifo)
