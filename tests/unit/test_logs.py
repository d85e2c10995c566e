"""logs.bound: the log context of a block, restored after it."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from reactor import logs

pytestmark = pytest.mark.unit


def test_bound_values_are_in_the_context_inside_the_block_and_what_was_there_before_comes_back() -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(release_id="outer")
    with logs.bound(release_id="inner", event_id="e1"):
        assert structlog.contextvars.get_contextvars() == {"release_id": "inner", "event_id": "e1"}
        with logs.bound(event_id="e2"):
            assert structlog.contextvars.get_contextvars() == {"release_id": "inner", "event_id": "e2"}
        assert structlog.contextvars.get_contextvars() == {"release_id": "inner", "event_id": "e1"}
    assert structlog.contextvars.get_contextvars() == {"release_id": "outer"}
    structlog.contextvars.clear_contextvars()


def test_bound_context_is_restored_when_the_block_raises() -> None:
    structlog.contextvars.clear_contextvars()
    with pytest.raises(RuntimeError), logs.bound(node_key="n1"):
        raise RuntimeError("handler failed")
    assert structlog.contextvars.get_contextvars() == {}


async def test_each_task_sees_only_what_it_bound() -> None:
    inside = asyncio.Event()
    seen: dict[str, dict[str, object]] = {}

    async def handle(name: str) -> None:
        with logs.bound(event_id=name):
            await inside.wait()
            seen[name] = structlog.contextvars.get_contextvars()

    tasks = [asyncio.create_task(handle(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    inside.set()
    await asyncio.gather(*tasks)
    assert seen == {"a": {"event_id": "a"}, "b": {"event_id": "b"}}
