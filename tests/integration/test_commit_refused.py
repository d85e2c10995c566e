"""A group member whose offset commit is refused (its group rebalanced meanwhile) keeps consuming, on Kafka.

The chaos tier saw a `reactor worker` exit with aiokafka's CommitFailedError ("Commit cannot be completed since the
group has already rebalanced") after the broker was killed and started again: the periodic commit of
`_GroupMember.run` (reactor/adapters/kafka_bus.py) let it end `consume()`, and with it the worker. A refused commit
loses nothing that matters: the offsets stay uncommitted, so the partition's next owner gets those messages again
and a redelivered request re-emits its recorded outcome. Here the refusal is injected once, under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CommitFailedError

from reactor.events import Event, ReleasePaused, Topic
from tests.conftest import fresh_kafka_bus
from tests.support import until

pytestmark = pytest.mark.kafka


@pytest.mark.timeout(180)
async def test_a_commit_refused_because_the_group_rebalanced_does_not_stop_the_consumer(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first commit after an event is handled is refused as after a rebalance; the member goes on and handles
    the next event."""
    refused: list[object] = []
    commit = AIOKafkaConsumer.commit

    async def refuse_once(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        if not refused:
            refused.append(offsets)
            raise CommitFailedError("Commit cannot be completed since the group has already rebalanced")
        await commit(self, offsets)

    monkeypatch.setattr(AIOKafkaConsumer, "commit", refuse_once)
    handled: list[str] = []

    async def handler(event: Event) -> None:
        handled.append(event.event_id)

    async with fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.01, grace_s=0.5) as bus:
        consuming = asyncio.create_task(bus.consume([Topic.RELEASES], "workers", handler))
        try:
            first, second = ReleasePaused(release_id="hello-1"), ReleasePaused(release_id="hello-2")
            await bus.publish(first)
            await until(lambda: refused and handled == [first.event_id], "the first commit is refused", 60)
            await bus.publish(second)
            await until(lambda: second.event_id in handled or consuming.done(), "the second event is handled", 60)
            assert not consuming.done(), f"the consumer stopped: {consuming.exception()!r}"
        finally:
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError, CommitFailedError):
                await consuming
