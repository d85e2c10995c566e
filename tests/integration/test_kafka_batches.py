"""One fetched batch on the real broker: a poison message in its middle goes to `dlq` alone, one key keeps its order
inside the batch, and with half the batch still running only the offsets before the first unfinished message are
committed.

Every message is on the topic before the consumer starts, so the first fetch hands them over as one batch (one
partition, fewer messages than a fetch takes). Held handlers wait on latches, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from uuid import uuid4

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from reactor.adapters.kafka_bus import KafkaBus
from reactor.codec import Record
from reactor.events import Event, ReleasePaused, Topic
from tests.support import running

pytestmark = pytest.mark.kafka

TIMEOUT_S = 30.0  # a bound for failures only


@contextlib.asynccontextmanager
async def one_partition_bus(bootstrap: str) -> AsyncIterator[KafkaBus]:
    async with KafkaBus(
        bootstrap, prefix=f"t{uuid4().hex[:10]}.", commit_interval_s=0.05, retry_delay_s=0.01, grace_s=5.0
    ) as bus:
        await bus.create_topics(partitions=1)
        yield bus


async def eventually(condition: Callable[[], object], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def committed(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    found = offsets.get(tp)
    return None if found is None or found.offset < 0 else int(found.offset)


async def eventually_committed(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    last: int | None = None
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while (last := await committed(bootstrap, group, tp)) != offset:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"committed offset stayed {last}, expected {offset}") from None


async def test_a_batch_with_a_poison_message_and_held_handlers_commits_only_what_finished(
    kafka_bootstrap: str,
) -> None:
    async with one_partition_bus(kafka_bootstrap) as bus:
        # offset: 0 rel-0 | 1 rel-1 #1 (held) | 2 poison, key rel-1 | 3 rel-1 #2 | 4 rel-2 | 5 rel-3 | 6 rel-4 (held)
        #         7 rel-5 | 8 rel-6
        poison = Record(key=b"rel-1", value=b"{ not a cloudevent", headers=())
        events: list[ReleasePaused | Record] = [
            ReleasePaused(release_id="rel-0", reason="1"),
            ReleasePaused(release_id="rel-1", reason="1"),
            poison,
            ReleasePaused(release_id="rel-1", reason="2"),
            ReleasePaused(release_id="rel-2", reason="1"),
            ReleasePaused(release_id="rel-3", reason="1"),
            ReleasePaused(release_id="rel-4", reason="1"),
            ReleasePaused(release_id="rel-5", reason="1"),
            ReleasePaused(release_id="rel-6", reason="1"),
        ]
        for item in events:
            if isinstance(item, Record):
                await bus.publish_raw(Topic.RELEASES, item)
            else:
                await bus.publish(item)
        tp = TopicPartition(bus.topic_name(Topic.RELEASES), 0)
        group = f"batch-{uuid4().hex[:8]}"
        first_of_rel_1, rel_4 = asyncio.Event(), asyncio.Event()
        started: list[str] = []
        finished: list[str] = []

        async def handler(event: Event) -> None:
            assert isinstance(event, ReleasePaused)
            name = f"{event.release_id}#{event.reason}"
            started.append(name)
            if name == "rel-1#1":
                await first_of_rel_1.wait()
            if name == "rel-4#1":
                await rel_4.wait()
            finished.append(name)

        async with running(bus.consume([Topic.RELEASES], group, handler)):
            others = {"rel-0#1", "rel-2#1", "rel-3#1", "rel-5#1", "rel-6#1"}
            await eventually(lambda: others <= set(finished), "the messages of other keys finished")
            # rel-1's second message waits behind its first (held), whatever else of the batch finished.
            assert "rel-1#2" not in started
            # Offsets 0 done, 1 (held) not: nothing past 1 may be committed, though 4..8 minus 6 are done.
            await eventually_committed(kafka_bootstrap, bus.group_id(group), tp, 1)
            first_of_rel_1.set()
            await eventually(lambda: "rel-1#2" in finished, "rel-1's second message finished")
            assert finished.index("rel-1#1") < finished.index("rel-1#2")
            [letter] = await bus.history(Topic.DLQ)
            assert letter.value == poison.value
            assert letter.key == poison.key
            # Now 0..5 are done (the poison dead-lettered), 6 (rel-4) still runs: committed up to it, not past.
            await eventually_committed(kafka_bootstrap, bus.group_id(group), tp, 6)
            rel_4.set()
            await eventually_committed(kafka_bootstrap, bus.group_id(group), tp, 9)
        assert sorted(finished) == sorted(
            f"{event.release_id}#{event.reason}" for event in events if isinstance(event, ReleasePaused)
        )
        assert len(finished) == len(set(finished)), "a message was handled twice"
