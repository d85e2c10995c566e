"""The in-memory bus keeps a bounded history per topic in the embedded runtime: a group already reading gets every
message, one that starts later gets what is kept, as on a Kafka topic with retention."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.events import Event, ReleasePaused, Topic
from reactor.runtime import open_backends
from reactor.settings import Settings

pytestmark = pytest.mark.unit


async def _read(bus: MemoryBus, group: str, seen: list[str]) -> asyncio.Task[None]:
    async def handle(event: Event) -> None:
        assert isinstance(event, ReleasePaused)
        seen.append(event.release_id)

    task = asyncio.create_task(bus.consume([Topic.RELEASES], group, handle))
    await asyncio.sleep(0)
    return task


async def test_a_bounded_history_keeps_the_newest_messages_and_live_groups_miss_nothing() -> None:
    bus = MemoryBus(history_limit=3)
    early: list[str] = []
    reading = await _read(bus, "early", early)
    names = [f"r{index}" for index in range(5)]
    for name in names:
        await bus.publish(ReleasePaused(release_id=name))
    await bus.idle()
    assert [record.key for record in await bus.history(Topic.RELEASES)] == [b"r2", b"r3", b"r4"]
    late: list[str] = []
    joining = await _read(bus, "late", late)
    await bus.idle()
    assert sorted(early) == names
    assert sorted(late) == ["r2", "r3", "r4"]
    for task in (reading, joining):
        task.cancel()
    await asyncio.gather(reading, joining, return_exceptions=True)


async def test_the_embedded_runtime_bounds_the_history_by_its_setting(tmp_path: Path) -> None:
    async with open_backends(Settings(state_dir=tmp_path, memory_history=2)) as backends:
        bus = backends.memory_bus
        assert bus is not None
        for index in range(4):
            await bus.publish(ReleasePaused(release_id=f"r{index}"))
        assert len(await bus.history(Topic.RELEASES)) == 2
    unbounded = MemoryBus()
    for index in range(4):
        await unbounded.publish(ReleasePaused(release_id=f"r{index}"))
    assert len(await unbounded.history(Topic.RELEASES)) == 4
