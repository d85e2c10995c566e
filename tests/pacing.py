"""What the pacer test modules share: a release plan of fake nodes and the consumers running on a store and a bus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import decode
from reactor.domain.pacer import ReleaseState
from reactor.events import Event, NodeTarget, Package, ReleasePlan, Strategy, Topic
from reactor.ports import EventBus, Store
from reactor.runtime import Role
from reactor.settings import Settings
from tests.fakes import Script, scripted
from tests.support import running_roles

PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="c" * 64)


def plan(count: int, strategy: Strategy, release_id: str = "app-2") -> ReleasePlan:
    """A release of service `app` to `count` fake nodes `fake/host-NN/app`."""
    return ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:02d}/app") for index in range(count)],
        strategy=strategy,
    )


@asynccontextmanager
async def reactor(
    store: Store,
    script: Script,
    tmp_path: Path,
    bus: MemoryBus | None = None,
    *,
    roles: frozenset[Role] = frozenset({Role.ALL}),
    **settings_changes: Any,
) -> AsyncIterator[MemoryBus]:
    """The given roles (every one by default) on an in-memory bus and `store`, with fast timers."""
    bus = bus or MemoryBus(retry_delay_s=0.01)
    async with running(bus, store, script, tmp_path, roles=roles, **settings_changes):
        yield bus


@asynccontextmanager
async def running(
    bus: EventBus,
    store: Store,
    script: Script,
    tmp_path: Path,
    *,
    roles: frozenset[Role] = frozenset({Role.ALL}),
    **settings_changes: Any,
) -> AsyncIterator[None]:
    """The given roles (every one by default) on any bus and store, with fast timers."""
    settings = Settings(state_dir=tmp_path, timer_tick_s=0.02, resend_after_s=3600, **settings_changes)
    async with running_roles(bus, store, settings, set(roles), {"fake": scripted(script)}):
        yield


async def published(bus: EventBus, topic: Topic) -> list[Event]:
    """Every event on `topic` so far, read back as a subscriber would (in order per partition)."""
    return [decode(record)[0] for record in await bus.history(topic)]


async def state_of(store: Store, release_id: str) -> ReleaseState | None:
    """The release's state, or None before it is known."""
    record = await store.get_release(release_id)
    return None if record is None else record.state
