"""A task module whose top level blocks (a slow model load, a network call) in any process whose
environment names a ``GATE``: it reports its pid on the FIFO ``ARRIVED`` names, then waits until
the gate FIFO's last writer, the test (``tests/test_zygote_trials.py``), closes it. The test
process imports it before it sets them."""

from __future__ import annotations

import os

from procsup import CancellationToken

GATE = "PROCSUP_TEST_IMPORT_GATE"
ARRIVED = "PROCSUP_TEST_IMPORT_ARRIVED"

if os.environ.get(GATE):
    _fd = os.open(os.environ[ARRIVED], os.O_WRONLY)
    os.write(_fd, b"%d\n" % os.getpid())
    os.close(_fd)
    with open(os.environ[GATE], "rb") as _gate:
        _gate.read()  # EOF once the test closes the gate


def value(token: CancellationToken, x: int) -> int:
    return x
