"""Small helpers shared by tests that wait for the reactor to get somewhere."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.events import Event
from reactor.ports import EventBus, ExecutorFactory, Store
from reactor.runtime import Backends, Role, run_roles
from reactor.settings import Settings


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


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, object]) -> AsyncIterator[asyncio.Task[object]]:
    """Run `work` as a task while the block runs; then cancel it and wait until it stopped. An error of its own (not
    the cancellation) is raised."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running_roles(
    bus: EventBus,
    store: Store,
    settings: Settings,
    roles: set[Role],
    factories: dict[str, ExecutorFactory] | None = None,
) -> AsyncIterator[None]:
    """Run the consumers of `roles` on `bus` and `store` while the block runs, then cancel them."""
    started = asyncio.Event()
    memory_bus = bus if isinstance(bus, MemoryBus) else None
    backends = Backends(bus=bus, store=store, memory_bus=memory_bus)
    async with running(run_roles(backends, settings, roles, factories=factories, started=started)):
        await started.wait()
        yield


async def equals(value: object, expected: object) -> bool:
    """`value` (awaited if it is a coroutine) equals `expected`."""
    if asyncio.iscoroutine(value):
        value = await value
    return value == expected


def peak_in_flight(
    commands: Sequence[Event], outcomes: Sequence[Event], scopes: Callable[[str, str], list[str]]
) -> dict[str, int]:
    """The most nodes in flight at once per scope, from the event log alone.

    A node is in flight from its first command (DeployRequested or RollbackRequested, by event id) to the
    first outcome caused by it; `scopes(release_id, node_key)` names the scopes it counts in. An outcome at
    the instant another command goes out closes first.
    """
    first_command: dict[str, Event] = {}
    for event in commands:
        first_command.setdefault(event.event_id, event)
    first_outcome: dict[str, Event] = {}
    for event in outcomes:
        if event.causation_id is not None:
            first_outcome.setdefault(event.causation_id, event)
    points: list[tuple[datetime, int, str]] = []
    for command_id, command in first_command.items():
        outcome = first_outcome.get(command_id)
        node_key = getattr(command, "node_key", "")
        for scope in scopes(command.release_id or "", node_key):
            points.append((command.occurred_at, 1, scope))
            if outcome is not None:
                points.append((outcome.occurred_at, -1, scope))
    points.sort(key=lambda point: (point[0], point[1]))
    open_now: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for _, step, scope in points:
        open_now[scope] = open_now.get(scope, 0) + step
        peaks[scope] = max(peaks.get(scope, 0), open_now[scope])
    return peaks


# The deploy policy of the trust tests: ci may release app to noop/web-* nodes from PACKAGES; ci and alice may approve,
# and four-eyes (the default) keeps ci from approving its own release.
PACKAGES = "https://packages.example.com/app/"
FOUR_EYES_POLICY = {
    "services": {
        "app": {
            "submit": ["ci"],
            "approve": ["ci", "alice"],
            "nodes": [{"key": "noop/web-*/app"}],
            "artifacts": {"packages": [PACKAGES]},
        }
    }
}
