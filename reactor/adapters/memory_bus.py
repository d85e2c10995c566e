"""In-memory event bus for the embedded mode and fast tests.

It runs every event through the same CloudEvents Kafka codec as the Kafka bus and the same dispatcher:
per-key order, different keys concurrently, retries of retriable failures, dead-lettering of the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import structlog

from reactor.adapters.dispatch import KeyedDispatcher, dead_letter_record, deliver
from reactor.codec import Record, decode, encode
from reactor.errors import DecodeError
from reactor.events import Event, Topic
from reactor.ports import Handler

log = structlog.get_logger(__name__)


class MemoryBus:
    """Topics as in-process logs; each consumer group starts at the beginning of a topic."""

    def __init__(self, *, source: str = "/reactor", concurrency: int = 256, retry_delay_s: float = 0.05) -> None:
        self.source = source
        self._concurrency = concurrency
        self._retry_delay_s = retry_delay_s
        self._logs: dict[Topic, list[Record]] = defaultdict(list)
        self._queues: dict[tuple[Topic, str], asyncio.Queue[Record]] = {}
        self._busy = 0
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def publish(self, event: Event) -> None:
        """Append the encoded event to its topic and hand it to every group reading that topic."""
        self._append(event.TOPIC, encode(event, self.source))

    async def publish_raw(self, topic: Topic, record: Record) -> None:
        """Append a raw message, valid or not (what a CI/CD system or a test may send)."""
        self._append(topic, record)

    async def history(self, topic: Topic) -> list[Record]:
        """Everything published to `topic` so far, in order."""
        return list(self._logs[topic])

    def _append(self, topic: Topic, record: Record) -> None:
        self._logs[topic].append(record)
        for (queue_topic, _), queue in self._queues.items():
            if queue_topic == topic:
                queue.put_nowait(record)
        self._changed.set()

    def records(self, topic: Topic) -> list[Record]:
        """Everything ever published to `topic`, in order (synchronous, for tests and the CLI)."""
        return list(self._logs[topic])

    def events(self, topic: Topic) -> list[Event]:
        """The valid events of `topic`, decoded, in order."""
        decoded = []
        for record in self._logs[topic]:
            with contextlib.suppress(DecodeError):
                decoded.append(decode(record)[0])
        return decoded

    async def idle(self, timeout_s: float = 60.0) -> None:
        """Return once every group's queue is empty and no handler is running."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._changed.clear()
                if self._quiet():
                    # Let handlers scheduled by the last publish start before declaring quiet.
                    await asyncio.sleep(0)
                    if self._quiet():
                        return
                await self._changed.wait()

    def _quiet(self) -> bool:
        return self._busy == 0 and all(queue.empty() for queue in self._queues.values())

    async def consume(self, topics: Sequence[Topic], group: str, handler: Handler) -> None:
        """Feed events to `handler`, per-key ordered, different keys concurrently, until cancelled."""

        async def process(item: tuple[Topic, Record]) -> None:
            await deliver(item[0], item[1], handler, self._dead_letter, retry_delay_s=self._retry_delay_s)

        unfinished: dict[int, tuple[Topic, Record]] = {}

        def done(item: tuple[Topic, Record]) -> None:
            unfinished.pop(id(item), None)
            self._busy -= 1
            self._changed.set()

        dispatcher: KeyedDispatcher[tuple[Topic, Record]] = KeyedDispatcher(process, done, limit=self._concurrency)
        try:
            async with asyncio.TaskGroup() as tasks:
                for topic in topics:
                    if (topic, group) not in self._queues:
                        queue: asyncio.Queue[Record] = asyncio.Queue()
                        for record in self._logs[topic]:
                            queue.put_nowait(record)
                        self._queues[(topic, group)] = queue
                    tasks.create_task(self._take(topic, self._queues[(topic, group)], dispatcher, unfinished))
        finally:
            self._busy -= dispatcher.pending
            await dispatcher.cancel()
            # What was taken but not finished goes back to the front of its group's queue, as an uncommitted
            # Kafka offset would be delivered again to the group's next member.
            for topic in topics:
                self._requeue(self._queues[(topic, group)], [r for t, r in unfinished.values() if t == topic])

    async def _take(
        self,
        topic: Topic,
        queue: asyncio.Queue[Record],
        dispatcher: KeyedDispatcher[tuple[Topic, Record]],
        unfinished: dict[int, tuple[Topic, Record]],
    ) -> None:
        while True:
            record = await queue.get()
            self._busy += 1
            item = (topic, record)
            unfinished[id(item)] = item
            dispatcher.submit(record.key, item)

    @staticmethod
    def _requeue(queue: asyncio.Queue[Record], first: list[Record]) -> None:
        rest = []
        while not queue.empty():
            rest.append(queue.get_nowait())
        for record in (*first, *rest):
            queue.put_nowait(record)

    async def _dead_letter(self, topic: Topic, record: Record, reason: str) -> None:
        log.warning("dead-lettered", topic=topic.value, reason=reason)
        self._append(Topic.DLQ, dead_letter_record(topic, record, reason))
