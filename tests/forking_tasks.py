"""Tasks for test_forking: this module registers an at-fork hook when imported, as libraries do
(imported by the zygote, the hook must run in every task forked after)."""

from __future__ import annotations

import os
import random

from procsup import CancellationToken

_forked_in = 0  # the pid the hook last ran in


def _after_fork() -> None:
    global _forked_in
    _forked_in = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def hook_ran_here(token: CancellationToken) -> bool:
    """True if the hook ran in this process: it was forked after this module was imported."""
    return _forked_in == os.getpid()


def random_bits(token: CancellationToken) -> int:
    return random.getrandbits(64)
