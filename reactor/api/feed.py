"""The events of each release, for the timeline and for live streams: one consumer fans out to every reader."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter

from reactor.adapters.kafka_bus import KafkaBus
from reactor.api.binding import structured
from reactor.api.kafka_source import read_kafka
from reactor.domain.replay import TimelineEntry, entry_for
from reactor.events import Event, Topic
from reactor.ports import EventBus

Document = dict[str, Any]
# Topics whose events belong to releases: the commands dispatched, the nodes' outcomes, the releases' own events.
TOPICS = (Topic.COMMANDS, Topic.OUTCOMES, Topic.RELEASES)
# The most events kept per release (a 10,000-node release with rollbacks stays well within it); oldest dropped.
PER_RELEASE = 100_000
# The most releases whose events are kept; the least recently active one is forgotten first.
RELEASES_KEPT = 10_000
# A reader that falls this far behind is cut off rather than let its backlog grow without end.
BACKLOG = 10_000

_ENTRY = TypeAdapter(TimelineEntry)


def document(topic: Topic, event: Event, source: str) -> Document:
    """One event as the API shows it: its timeline entry (as `reactor replay` prints it) and the CloudEvent."""
    return {**_ENTRY.dump_python(entry_for(topic, event, source), mode="json"), "cloudevent": structured(event, source)}


class StreamEnded(Exception):
    """A live reader was let go: it fell more than BACKLOG events behind, or the server is stopping."""


_CUT_OFF = "this reader fell too far behind; reconnect with Last-Event-ID"
_CLOSING = "the server is stopping; reconnect with Last-Event-ID"


class _Timeline:
    """One release's events, at most PER_RELEASE, with their ids for deduplication."""

    def __init__(self) -> None:
        self.items: deque[Document] = deque()
        self.ids: set[str] = set()

    def append(self, item: Document) -> None:
        if len(self.items) == PER_RELEASE:
            self.ids.discard(self.items.popleft()["event_id"])
        self.items.append(item)
        self.ids.add(item["event_id"])


class Feed:
    """Keeps each release's events in arrival order and hands new ones to live readers."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._timelines: OrderedDict[str, _Timeline] = OrderedDict()
        self._readers: dict[str, set[asyncio.Queue[Document | str]]] = defaultdict(set)
        self._closing = False

    async def run(self, bus: EventBus) -> None:
        """Read the release topics from the beginning until cancelled.

        On Kafka without a consumer group (`reactor.api.kafka_source`); on the in-memory bus in a group of its own.
        """
        if isinstance(bus, KafkaBus):
            await read_kafka(bus, TOPICS, self.add_event)
            return

        async def handle(event: Event) -> None:
            self.add_event(event)

        await bus.consume(TOPICS, f"api-{uuid.uuid4().hex[:12]}", handle)

    def add_event(self, event: Event) -> None:
        """Record one event from the bus (its topic is its type's)."""
        self.add(event.TOPIC, event)

    def add(self, topic: Topic, event: Event) -> None:
        """Record one event and hand it to the release's live readers (each event id once)."""
        release_id = event.release_id
        if release_id is None:
            return
        timeline = self._timelines.get(release_id)
        if timeline is None:
            timeline = self._timelines[release_id] = _Timeline()
            if len(self._timelines) > RELEASES_KEPT:
                self._timelines.popitem(last=False)
        elif event.event_id in timeline.ids:
            return
        self._timelines.move_to_end(release_id)
        item = document(topic, event, self.source)
        timeline.append(item)
        readers = self._readers.get(release_id, set())
        for queue in list(readers):
            if queue.qsize() >= BACKLOG:
                readers.discard(queue)
                queue.put_nowait(_CUT_OFF)
            else:
                queue.put_nowait(item)

    def close(self) -> None:
        """Let every live reader go (the server is stopping), now and whoever comes later."""
        self._closing = True
        for readers in self._readers.values():
            for queue in readers:
                queue.put_nowait(_CLOSING)
            readers.clear()

    def timeline(self, release_id: str) -> list[Document]:
        """The release's events seen so far, in arrival order."""
        timeline = self._timelines.get(release_id)
        return [] if timeline is None else list(timeline.items)

    @contextlib.asynccontextmanager
    async def follow(self, release_id: str, after: str | None = None) -> AsyncIterator[Reader]:
        """The release's events so far (after event id `after`, if it is among them), then live ones, as they come.

        Taking the past and subscribing happen together, between two awaits, so no event is missed or repeated.
        """
        queue: asyncio.Queue[Document | str] = asyncio.Queue()
        past = self.timeline(release_id)
        ids = [item["event_id"] for item in past]
        if after is not None and after in ids:
            past = past[ids.index(after) + 1 :]
        for item in past:
            queue.put_nowait(item)
        if self._closing:
            queue.put_nowait(_CLOSING)
        else:
            self._readers[release_id].add(queue)
        try:
            yield Reader(queue)
        finally:
            readers = self._readers.get(release_id, set())
            readers.discard(queue)
            if not readers:
                self._readers.pop(release_id, None)


class Reader:
    """One live reader of a release's events."""

    def __init__(self, queue: asyncio.Queue[Document | str]) -> None:
        self._queue = queue

    async def next_event(self, timeout_s: float) -> Document | None:
        """The next event, or None if none came within `timeout_s`; StreamEnded (saying why) once let go."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if isinstance(item, str):
            raise StreamEnded(item)
        return item
