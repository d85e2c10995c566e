"""In-memory event bus for the embedded mode and fast tests.

It shares the Kafka bus's dispatcher: per-key order, different keys concurrently, retries of retriable
failures, dead-lettering of the rest. Events published in-process are handed over as they are; raw messages
go through the same CloudEvents codec as on Kafka, and any message is encoded when someone reads the log. With
signatures required (or `through_codec`) every event goes through the codec, signed and verified, as on Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import Sequence
from functools import partial
from types import TracebackType
from typing import Self

from reactor import logs
from reactor.adapters.dispatch import KeyedDispatcher, dead_letter_record, deliver
from reactor.codec import Record, check_size, decode, encode
from reactor.errors import DecodeError, first_reactor_error
from reactor.events import Event, Topic
from reactor.ports import Handler, Interest
from reactor.trust.enforcement import NO_SIGNATURES, Signatures

log = logs.get_logger(__name__)


class MemoryBus:
    """Topics as in-process logs; each consumer group starts at the beginning of a topic."""

    def __init__(
        self,
        *,
        source: str = "/reactor",
        concurrency: int = 256,
        retry_delay_s: float = 0.05,
        signatures: Signatures = NO_SIGNATURES,
        through_codec: bool = False,
        history_limit: int | None = None,
    ) -> None:
        """`history_limit`: the messages kept per topic for groups that start later and for `history` (None: all,
        as tests want; the embedded runtime keeps the last few thousand, so a long run does not hold every event
        it ever carried, as a Kafka topic's retention would not)."""
        self.source = source
        self.signatures = signatures
        # Every published event encoded (and signed, with a key) at once and decoded (and verified, when signatures
        # are required) on delivery, as on Kafka; otherwise events are handed over as they are.
        self.through_codec = through_codec or signatures.required
        self.concurrency = concurrency
        self.retry_delay_s = retry_delay_s
        self._logs: dict[Topic, deque[_Message]] = defaultdict(partial(deque, maxlen=history_limit))
        self._queues: dict[tuple[Topic, str], asyncio.Queue[_Message]] = {}
        self._busy = 0
        self._changed = asyncio.Event()
        self._owners: dict[tuple[str, bytes | None], _Member] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def publish(self, event: Event) -> None:
        """Append the event to its topic and hand it to every group reading that topic."""
        if self.through_codec:
            # As on Kafka: an event larger than a reader takes is refused here, not dead-lettered by the readers.
            record = encode(event, self.source)
            check_size(event, record)
            self._append(event.TOPIC, _Message(self.source, record=self.signatures.sign(record)))
            return
        self._append(event.TOPIC, _Message(self.source, event=event, signatures=self.signatures))

    async def publish_raw(self, topic: Topic, record: Record) -> None:
        """Append a raw message, valid or not (what a CI/CD system or a test may send)."""
        self._append(topic, _Message(self.source, record=record))

    async def history(self, topic: Topic) -> list[Record]:
        """Everything published to `topic` so far, in order."""
        return self.records(topic)

    def _append(self, topic: Topic, message: _Message) -> None:
        self._logs[topic].append(message)
        for (queue_topic, _), queue in self._queues.items():
            if queue_topic == topic:
                queue.put_nowait(message)
        self._changed.set()

    def records(self, topic: Topic) -> list[Record]:
        """Everything ever published to `topic`, in order (synchronous, for tests and the CLI)."""
        return [message.record() for message in self._logs[topic]]

    def events(self, topic: Topic) -> list[Event]:
        """The valid events of `topic`, in order."""
        decoded = []
        for message in self._logs[topic]:
            if message.event is not None:
                decoded.append(message.event)
                continue
            with contextlib.suppress(DecodeError):
                decoded.append(decode(message.record())[0])
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

    async def consume(
        self, topics: Sequence[Topic], group: str, handler: Handler, *, wants: Interest | None = None
    ) -> None:
        """Feed events to `handler`, per-key ordered, different keys concurrently, until cancelled; see
        EventBus.consume for `wants`."""
        member = _Member(self, group, handler, wants)
        try:
            with first_reactor_error():
                async with asyncio.TaskGroup() as tasks:
                    for topic in topics:
                        if (topic, group) not in self._queues:
                            queue: asyncio.Queue[_Message] = asyncio.Queue()
                            for message in self._logs[topic]:
                                queue.put_nowait(message)
                            self._queues[(topic, group)] = queue
                        tasks.create_task(self._take(topic, self._queues[(topic, group)], member))
                    tasks.create_task(member.stop_on_failure())
        finally:
            self._busy -= member.dispatcher.pending
            await member.dispatcher.cancel()
            # What was taken but not finished goes back to the front of its group's queue, as an uncommitted
            # Kafka offset would be delivered again to the group's next member.
            for key in member.owned:
                self._owners.pop((group, key), None)
            for topic in topics:
                self._requeue(self._queues[(topic, group)], [r for t, r in member.unfinished.values() if t == topic])

    async def _take(self, topic: Topic, queue: asyncio.Queue[_Message], member: _Member) -> None:
        while True:
            message = await queue.get()
            if member.wants is not None and message.event is not None and not member.wants(message.event):
                # Published here, so nothing to check: finished as the handler would finish it, at no cost (no
                # task, no lane). Skipping it changes no order: it does nothing.
                continue
            self._busy += 1
            # A key with events in flight stays with the member handling them, as a partition stays with one
            # member of a Kafka group: that keeps one key's events in order across the group.
            owner = self._owners.setdefault((member.group, message.key), member)
            owner.take(topic, message)

    @staticmethod
    def _requeue(queue: asyncio.Queue[_Message], first: list[_Message]) -> None:
        rest = []
        while not queue.empty():
            rest.append(queue.get_nowait())
        for message in (*first, *rest):
            queue.put_nowait(message)

    def release_owner(self, group: str, key: bytes | None, member: _Member) -> None:
        """A member finished every event of `key` it had; the next one may go to any member."""
        if self._owners.get((group, key)) is member:
            del self._owners[(group, key)]

    def finished_one(self) -> None:
        """An event was handled (for `idle`)."""
        self._busy -= 1
        self._changed.set()

    async def dead_letter(self, topic: Topic, record: Record, reason: str) -> None:
        """Park a rejected message on the dead-letter topic with the reason."""
        log.warning("dead-lettered", topic=topic.value, reason=reason)
        self._append(Topic.DLQ, _Message(self.source, record=dead_letter_record(topic, record, reason)))


class _Message:
    """One message of a topic: the event as published in-process, or raw bytes; encoded only when read."""

    __slots__ = ("_record", "event", "key", "signatures", "source")

    def __init__(
        self,
        source: str,
        *,
        event: Event | None = None,
        record: Record | None = None,
        signatures: Signatures = NO_SIGNATURES,
    ) -> None:
        self.source = source
        self.signatures = signatures
        self.event = event
        self._record = record
        if record is not None:
            self.key = record.key
        elif event is not None:
            self.key = event.subject().encode()
        else:
            raise ValueError("a message needs an event or a record")

    def record(self) -> Record:
        """The message as Kafka would carry it (signed, when this process has a key)."""
        if self._record is None:
            assert self.event is not None  # noqa: S101 (the constructor guarantees one of the two)
            self._record = self.signatures.sign(encode(self.event, self.source))
        return self._record


class _Member:
    """One consumer of a group: its handler, its dispatcher, the keys it owns and what it has not finished."""

    def __init__(self, bus: MemoryBus, group: str, handler: Handler, wants: Interest | None = None) -> None:
        self.bus = bus
        self.group = group
        self.handler = handler
        self.wants = wants
        self.dispatcher: KeyedDispatcher[tuple[Topic, _Message]] = KeyedDispatcher(
            self._process, self._done, limit=bus.concurrency
        )
        self.unfinished: dict[int, tuple[Topic, _Message]] = {}
        self.owned: dict[bytes | None, int] = {}

    async def stop_on_failure(self) -> None:
        """Raise the error that stops this member (see KeyedDispatcher.failure), when there is one."""
        raise await self.dispatcher.failed()

    def take(self, topic: Topic, message: _Message) -> None:
        item = (topic, message)
        self.unfinished[id(item)] = item
        self.owned[message.key] = self.owned.get(message.key, 0) + 1
        self.dispatcher.submit(message.key, item)

    async def _process(self, item: tuple[Topic, _Message]) -> None:
        topic, message = item
        await deliver(
            topic,
            message.record,
            self.handler,
            self.bus.dead_letter,
            retry_delay_s=self.bus.retry_delay_s,
            event=message.event,
            check=self.bus.signatures.check,
            wants=self.wants,
        )

    def _done(self, item: tuple[Topic, _Message]) -> None:
        self.unfinished.pop(id(item), None)
        key = item[1].key
        self.owned[key] -= 1
        if self.owned[key] == 0:
            del self.owned[key]
            self.bus.release_owner(self.group, key, self)
        self.bus.finished_one()
