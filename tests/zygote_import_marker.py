"""A task module that records which process ran its top level: as ``IMPORTED_BY``, and as a line
appended to the file ``LOG`` names, if set (``tests/test_zygote_trials.py``)."""

from __future__ import annotations

import os

from procsup import CancellationToken

LOG = "PROCSUP_TEST_IMPORT_LOG"
IMPORTED_BY = os.getpid()

if os.environ.get(LOG):
    with open(os.environ[LOG], "a") as _log:  # one short write: O_APPEND keeps lines whole
        _log.write(f"{IMPORTED_BY}\n")


def where(token: CancellationToken) -> tuple[int, int]:
    """Which process ran this module's top level, and which runs this task."""
    return IMPORTED_BY, os.getpid()
