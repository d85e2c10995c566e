"""The HTTP API's event feed on each bus: past events then live ones per release, invalid messages skipped."""

from __future__ import annotations

import asyncio
import contextlib

from reactor.adapters.kafka_bus import KafkaBus
from reactor.api.feed import Feed
from reactor.codec import Record
from reactor.events import ReleasePaused, ReleaseResumed, Topic
from reactor.ports import EventBus


async def test_the_feed_gives_each_release_its_events_past_then_live_and_skips_invalid_ones(bus: EventBus) -> None:
    """Events published before the feed starts are there, later ones arrive live, other releases' stay apart, a
    message no one can decode is skipped; on Kafka the feed reads without a group, so it dead-letters nothing."""
    before = ReleasePaused(release_id="feed-1", reason="before")
    await bus.publish(before)
    await bus.publish(ReleasePaused(release_id="feed-2"))
    # Keyed like feed-1's events, so it sits in their partition, ahead of `sentinel`.
    await bus.publish_raw(Topic.RELEASES, Record(key=b"feed-1", value=b"not json", headers=()))
    sentinel = ReleaseResumed(release_id="feed-1", reason="sentinel")
    await bus.publish(sentinel)

    feed = Feed("/reactor")
    reading = asyncio.create_task(feed.run(bus))
    try:
        async with feed.follow("feed-1") as reader:
            seen: list[str] = []
            while sentinel.event_id not in seen:
                item = await reader.next_event(30)
                assert item is not None, f"no event within 30 s; seen {seen}"
                seen.append(item["event_id"])
            assert seen == [before.event_id, sentinel.event_id]

            live = ReleasePaused(release_id="feed-1", reason="live")
            await bus.publish(live)
            item = await reader.next_event(30)
            assert item is not None
            assert (item["event_id"], item["event_type"], item["cloudevent"]["data"]["reason"]) == (
                live.event_id,
                "ReleasePaused",
                "live",
            )
        assert [item["event_id"] for item in feed.timeline("feed-1")] == [*seen, live.event_id]
        assert len(feed.timeline("feed-2")) == 1
        if isinstance(bus, KafkaBus):
            assert await bus.history(Topic.DLQ) == []
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
