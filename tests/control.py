"""What a test holds the reactor still with, to check a limit at a moment it chose: a memory bus that tells when
its consumers have caught up, the pacers' timer ticks, and `settle`, which waits for both."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.consumers.pacer import TIMER_LEASE
from reactor.events import Event, Topic
from reactor.ports import Handler, Interest, Store
from tests.fakes import Script
from tests.support import until


class WatchedBus(MemoryBus):
    """A MemoryBus that counts, per consumer group, the handlers running and the messages handled to the end."""

    def __init__(self, *, retry_delay_s: float = 0.01) -> None:
        super().__init__(retry_delay_s=retry_delay_s)
        self.topics: dict[str, Sequence[Topic]] = {}
        self.running: Counter[str] = Counter()
        self.handled: Counter[str] = Counter()

    async def consume(
        self, topics: Sequence[Topic], group: str, handler: Handler, *, wants: Interest | None = None
    ) -> None:
        """Consume as MemoryBus does, counting each call of `handler`."""
        self.topics[group] = topics

        async def watched(event: Event) -> None:
            self.running[group] += 1
            try:
                await handler(event)
            finally:
                self.running[group] -= 1
            self.handled[group] += 1  # a call that raised is retried or dead-lettered: not handled

        def turned_down(event: Event) -> bool:
            """`wants`, counting an event it turns down as handled (finished without a call)."""
            if wants is None or wants(event):
                return True
            self.handled[group] += 1
            return False

        await super().consume(topics, group, watched, wants=None if wants is None else turned_down)

    def settled(self, *, blocked: int = 0) -> bool:
        """Whether every group has handled every event of its topics but for `blocked` handlers still running
        (those the test holds on a latch), so that nothing published so far can lead to anything more."""
        if sum(self.running.values()) != blocked:
            return False
        return all(
            self.handled[group] + self.running[group] >= sum(len(self.events(topic)) for topic in topics)
            for group, topics in self.topics.items()
        )


class TimerTicks:
    """The timer ticks the pacers on `store` begin, counted by the timer lease each tick takes first, and the
    ticks they skip because another holder has it."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.begun: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        take_lease = store.take_lease

        async def counted(name: str, holder: str, *, now: datetime, ttl_s: float) -> bool:
            taken = await take_lease(name, holder, now=now, ttl_s=ttl_s)
            if name == TIMER_LEASE:
                (self.begun if taken else self.refused)[holder] += 1
            return taken

        monkeypatch.setattr(store, "take_lease", counted)

    async def whole_tick(self) -> None:
        """Wait until a pacer has run a whole tick that began after this call: it begins the next one after it."""
        before = Counter(self.begun)
        await until(
            lambda: any(count >= before[holder] + 2 for holder, count in self.begun.items()), "a whole timer tick"
        )


async def settle(bus: WatchedBus, script: Script, ticks: TimerTicks) -> None:
    """Wait until the reactor can do nothing more while the held deploys stay held: every event handled but
    theirs, then a whole timer tick, then whatever that tick published handled too."""
    await until(lambda: bus.settled(blocked=len(script.held)), "every event but the held deploys is handled")
    await ticks.whole_tick()
    await until(lambda: bus.settled(blocked=len(script.held)), "what the timer tick published is handled")
