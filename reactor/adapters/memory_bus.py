"""In-memory event bus for the embedded mode and fast tests.

It runs every event through the same CloudEvents Kafka codec as the Kafka bus, keeps per-key order while
processing different keys concurrently, retries retriable failures and dead-letters invalid messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import structlog

from reactor.codec import Record, decode, encode
from reactor.errors import DecodeError, ReactorError
from reactor.events import Event, Topic
from reactor.ports import Handler

log = structlog.get_logger(__name__)

DLQ_REASON = "reactor_dlq_reason"
DLQ_TOPIC = "reactor_dlq_topic"


class _Group:
    """One consumer group on one topic: a queue of records not yet taken."""

    def __init__(self, backlog: list[Record]) -> None:
        self.queue: asyncio.Queue[Record] = asyncio.Queue()
        for record in backlog:
            self.queue.put_nowait(record)


class MemoryBus:
    """Topics as in-process logs; each consumer group starts at the beginning of a topic."""

    def __init__(self, *, source: str = "/reactor", concurrency: int = 256, retry_delay_s: float = 0.05) -> None:
        self.source = source
        self._concurrency = concurrency
        self._retry_delay_s = retry_delay_s
        self._logs: dict[Topic, list[Record]] = defaultdict(list)
        self._groups: dict[tuple[Topic, str], _Group] = {}
        self._busy = 0
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def publish(self, event: Event) -> None:
        """Append the encoded event to its topic and hand it to every group reading that topic."""
        self.publish_record(event.TOPIC, encode(event, self.source))

    def publish_record(self, topic: Topic, record: Record) -> None:
        """Append a raw record, valid or not (CI/CD and tests publish raw bytes too)."""
        self._logs[topic].append(record)
        for (group_topic, _), group in self._groups.items():
            if group_topic == topic:
                group.queue.put_nowait(record)
        self._changed.set()

    def records(self, topic: Topic) -> list[Record]:
        """Everything ever published to `topic`, in order (for replay and tests)."""
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
                if self._busy == 0 and all(group.queue.empty() for group in self._groups.values()):
                    # Let handlers scheduled by the last publish start before declaring quiet.
                    await asyncio.sleep(0)
                    if self._busy == 0 and all(group.queue.empty() for group in self._groups.values()):
                        return
                await self._changed.wait()

    async def consume(self, topics: Sequence[Topic], group: str, handler: Handler) -> None:
        """Feed events to `handler`, per-key ordered, different keys concurrently, until cancelled."""
        semaphore = asyncio.Semaphore(self._concurrency)
        lanes: dict[bytes | None, deque[tuple[Topic, Record]]] = {}
        async with asyncio.TaskGroup() as tasks:
            for topic in topics:
                if (topic, group) not in self._groups:
                    self._groups[(topic, group)] = _Group(self._logs[topic])
                tasks.create_task(self._take(topic, self._groups[(topic, group)], lanes, semaphore, handler, tasks))

    async def _take(
        self,
        topic: Topic,
        group: _Group,
        lanes: dict[bytes | None, deque[tuple[Topic, Record]]],
        semaphore: asyncio.Semaphore,
        handler: Handler,
        tasks: asyncio.TaskGroup,
    ) -> None:
        while True:
            record = await group.queue.get()
            self._busy += 1
            lane = lanes.get(record.key)
            if lane is not None:
                lane.append((topic, record))
                continue
            lanes[record.key] = deque([(topic, record)])
            tasks.create_task(self._run_lane(record.key, lanes, semaphore, handler))

    async def _run_lane(
        self,
        key: bytes | None,
        lanes: dict[bytes | None, deque[tuple[Topic, Record]]],
        semaphore: asyncio.Semaphore,
        handler: Handler,
    ) -> None:
        lane = lanes[key]
        try:
            while lane:
                topic, record = lane[0]
                async with semaphore:
                    await self._deliver(topic, record, handler)
                lane.popleft()
                self._busy -= 1
                self._changed.set()
        finally:
            del lanes[key]

    async def _deliver(self, topic: Topic, record: Record, handler: Handler) -> None:
        try:
            event, _source = decode(record)
        except DecodeError as exc:
            self._dead_letter(topic, record, str(exc))
            return
        while True:
            try:
                await handler(event)
            except ReactorError as exc:
                if not exc.retriable:
                    self._dead_letter(topic, record, f"handler: {exc}")
                    return
                log.warning("retrying event", error=str(exc), event_type=event.TYPE)
                await asyncio.sleep(self._retry_delay_s)
            except Exception as exc:  # a handler bug must not stop the worker: park the event with the reason
                log.exception("handler crashed; event sent to the dead-letter topic", event_type=event.TYPE)
                self._dead_letter(topic, record, f"handler crashed: {type(exc).__name__}: {exc}")
                return
            else:
                return

    def _dead_letter(self, topic: Topic, record: Record, reason: str) -> None:
        log.warning("dead-lettered", topic=topic.value, reason=reason)
        headers = (*record.headers, (DLQ_REASON, reason.encode()), (DLQ_TOPIC, topic.value.encode()))
        self.publish_record(Topic.DLQ, Record(key=record.key, value=record.value, headers=headers))
