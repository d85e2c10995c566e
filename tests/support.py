"""Small helpers shared by tests that wait for the reactor to get somewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Poll a plain or async condition until it holds; fail naming `what` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = condition()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s}s waiting until {what}")


async def equals(value: object, expected: object) -> bool:
    """`value` (awaited if it is a coroutine) equals `expected`."""
    if asyncio.iscoroutine(value):
        value = await value
    return value == expected
