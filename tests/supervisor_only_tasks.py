"""A task module that imports only in the process that set PROCSUP_TEST_SUPERVISOR to its pid:
in a task process its import fails, as a module missing from a deployment would."""

from __future__ import annotations

import os

from procsup import CancellationToken

if os.environ.get("PROCSUP_TEST_SUPERVISOR") != str(os.getpid()):
    raise ImportError("procsup test: this module imports only in the supervisor process")


def nothing(token: CancellationToken) -> None:
    """Never runs in a task: its module cannot be imported there."""
