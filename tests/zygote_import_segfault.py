"""A task module whose top level segfaults (a broken C extension's, say) in any process whose
environment sets ``CRASH``: the test process imports it before it sets that
(``tests/test_zygote_trials.py``), so only its tasks and the zygote's trial import it crashing."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import resource

from procsup import CancellationToken

CRASH = "PROCSUP_TEST_IMPORT_SEGFAULT"

if os.environ.get(CRASH) == "1":
    # No core file to write, nor a faulthandler dump inherited from pytest to print.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    faulthandler.disable()
    ctypes.string_at(0)


def never(token: CancellationToken) -> str:
    return "never"
