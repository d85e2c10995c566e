"""Helpers shared by tests that run the reactor's consumers and wait for it to get somewhere."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.events import NodeTarget, Package, ReleasePlan, Strategy
from reactor.ports import Store
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings
from tests.fakes import Script, scripted


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


PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="c" * 64)


def fake_plan(count: int, strategy: Strategy, release_id: str = "app-2") -> ReleasePlan:
    """A release of app 2.0.0 to `count` nodes `fake/host-NN/app` (the scripted executor's platform)."""
    return ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:02d}/app") for index in range(count)],
        strategy=strategy,
    )


@asynccontextmanager
async def running_reactor(
    store: Store, script: Script, tmp_path: Path, roles: frozenset[Role] = frozenset({Role.ALL}), **settings: Any
) -> AsyncIterator[MemoryBus]:
    """The consumers of `roles` on a fresh in-memory bus and `store`, with fast timers, while the block runs."""
    bus = MemoryBus(retry_delay_s=0.01)
    started = asyncio.Event()
    options: dict[str, Any] = {"timer_tick_s": 0.02, "resend_after_s": 3600, **settings}
    task = asyncio.create_task(
        run_roles(
            Backends(bus=bus, store=store, memory_bus=bus),
            Settings(state_dir=tmp_path, **options),
            set(roles),
            factories={"fake": scripted(script)},
            started=started,
        )
    )
    await started.wait()
    try:
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
