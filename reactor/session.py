"""Run the embedded reactor in this process for one piece of work, and report what happened."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from reactor.adapters.memory_bus import MemoryBus
from reactor.domain.pacer import ReleaseState
from reactor.errors import ReactorError
from reactor.events import Event, ReleaseEvent, Topic
from reactor.ports import ExecutorFactory
from reactor.runtime import Backends, Role, open_backends, run_roles
from reactor.settings import Settings

Observer = Callable[[Event], None]
# States in which a release goes on by itself (outcomes, timers, rollbacks) without anyone's command.
_MOVING = frozenset({ReleaseState.RUNNING, ReleaseState.WAITING, ReleaseState.ROLLING_BACK})


class Session:
    """An embedded reactor with every role running, ready to take events."""

    def __init__(self, backends: Backends, bus: MemoryBus) -> None:
        self.backends = backends
        self.bus = bus

    async def submit(self, event: Event) -> None:
        """Publish an event and wait until the reactor has done everything it leads to."""
        await self.bus.publish(event)
        await self.settle()

    async def settle(self, timeout_s: float = 600.0) -> None:
        """Wait until no event is waiting and no handler is running."""
        await self.bus.idle(timeout_s)

    async def settle_release(self, release_id: str, timeout_s: float = 3600.0) -> None:
        """Wait until the release needs a human or is over: timers and deadlines fire meanwhile."""
        async with asyncio.timeout(timeout_s):
            while True:
                await self.settle(timeout_s)
                if await self.release_state(release_id) not in _MOVING:
                    return
                await asyncio.sleep(0.05)

    async def release_state(self, release_id: str) -> ReleaseState | None:
        """Where a release is, per the store."""
        record = await self.backends.store.get_release(release_id)
        return None if record is None else record.state


@asynccontextmanager
async def embedded(
    settings: Settings,
    *,
    observer: Observer | None = None,
    factories: dict[str, ExecutorFactory] | None = None,
) -> AsyncIterator[Session]:
    """Start every role on an in-memory bus and the embedded store; stop them on exit."""
    async with open_backends(settings) as backends:
        bus = backends.memory_bus
        if bus is None:
            raise ReactorError("an embedded session needs the in-memory bus")
        started = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            roles = tasks.create_task(run_roles(backends, settings, {Role.ALL}, factories=factories, started=started))
            watcher = None
            if observer is not None:
                watcher = tasks.create_task(bus.consume([Topic.OUTCOMES, Topic.RELEASES], "cli", _observe(observer)))
            await started.wait()
            try:
                yield Session(backends, bus)
            finally:
                for task in (roles, watcher):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task


def _observe(observer: Observer) -> Callable[[Event], Awaitable[None]]:
    async def handle(event: Event) -> None:
        observer(event)

    return handle


async def submit_and_follow(
    settings: Settings,
    event: Event,
    *,
    observer: Observer,
    finished: Callable[[Event], bool],
    follow: bool = True,
    timeout_s: float = 3600.0,
) -> None:
    """Publish `event` and show what follows until `finished` says so.

    Embedded mode runs every role here and returns when all work is done. Distributed mode only publishes to
    the shared bus (workers elsewhere do the work) and, with `follow`, watches its outcomes.
    """
    if settings.mode == "embedded":
        async with embedded(settings, observer=observer) as session:
            await session.submit(event)
            if isinstance(event, ReleaseEvent):
                await session.settle_release(event.release_id, timeout_s)
        return
    async with open_backends(settings) as backends:
        if not follow:
            await backends.bus.publish(event)
            return
        done = asyncio.Event()

        async def watch(seen: Event) -> None:
            observer(seen)
            if finished(seen):
                done.set()

        # A group of its own, from the beginning: nothing published after the request can be missed.
        group = f"cli-{uuid.uuid4().hex[:12]}"
        watcher = asyncio.create_task(backends.bus.consume([Topic.OUTCOMES, Topic.RELEASES], group, watch))
        try:
            await backends.bus.publish(event)
            async with asyncio.timeout(timeout_s):
                await done.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
