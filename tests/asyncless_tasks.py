"""Task bodies for the lazy asyncio import tests: this module must not import asyncio."""

from __future__ import annotations

from typing import Any

from procsup import CancellationToken


def value(token: CancellationToken, result: Any) -> Any:
    return result


async def async_value(token: CancellationToken, result: Any) -> Any:
    return result
