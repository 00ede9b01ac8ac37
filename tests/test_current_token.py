"""procsup.current_token(): the token of the critical task the caller runs in."""

from __future__ import annotations

import pytest

import procsup
from procsup import Supervisor
from tests import tasks
from tests.tasks import DEADLINE


def test_current_token_in_a_task_is_its_token(runtime: Supervisor) -> None:
    """Test that a task reads its own token with current_token(), under every start method."""
    assert runtime.spawn(tasks.current_is_mine, "mine").join(DEADLINE) is True


def test_current_token_outside_a_task_raises() -> None:
    """Test that the supervisor's own process is in no task."""
    with pytest.raises(RuntimeError, match="outside a critical task"):
        procsup.current_token()
