"""How large an event the bus carries, on the real broker.

Commands and outcomes are small and stay under Kafka's default 1 MiB message. A release's request carries its plan's
nodes (up to 100,000), so the releases topic takes messages of up to `MAX_MESSAGE_BYTES` (its max.message.bytes,
set by `reactor topics create`), and its readers fetch that much. A request larger than the codec takes is refused
before anything is sent, naming its nodes and how many of them fit; the largest that fits goes through the broker and
is read back whole. A topic made without that setting refuses the message with an error saying what to do, and
`reactor topics create` raises it, keeping the topic's other settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.kafka_security import MAX_MESSAGE_BYTES
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import MAX_EVENT_BYTES, MAX_RELEASE_EVENT_BYTES, decode, encode
from reactor.errors import InvalidInput, Misconfigured
from reactor.events import NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from tests.conftest import fresh_kafka_bus
from tests.infra import kafka_secure
from tests.pacing import PACKAGE

pytestmark = pytest.mark.kafka

BROKER_DEFAULT = 1_048_576  # the broker's default max.message.bytes, which the other topics keep


def fleet(count: int, release_id: str, *, url_bytes: int = 0) -> ReleasePlan:
    """`count` nodes; with `url_bytes`, each has a package of its own whose URL is about that long (a large node)."""
    padding = "p" * url_bytes

    def package(index: int) -> Package | None:
        if not url_bytes:
            return None
        return Package(url=f"https://packages.example.test/{padding}/app-{index}.tar.gz", sha256="e" * 64)

    return ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:05d}/app", package=package(index)) for index in range(count)],
        strategy=Strategy(batches=[1, "10%"], max_parallel=50),
    )


def size_of(plan: ReleasePlan) -> int:
    return len(encode(ReleaseRequested(release_id=plan.release_id, plan=plan), "/reactor").value)


def too_large() -> ReleasePlan:
    """A release whose request is over what a reader of the releases topic takes: 30,000 nodes of about 1.2 KB."""
    plan = fleet(30_000, "too-large", url_bytes=1_100)
    assert MAX_RELEASE_EVENT_BYTES < size_of(plan) < 2 * MAX_RELEASE_EVENT_BYTES
    return plan


def fitting(refused: InvalidInput) -> int:
    found = re.search(r"about ([\d,]+) of these nodes fit", refused.rule)
    assert found is not None, refused.rule
    return int(found.group(1).replace(",", ""))


def test_the_limits_are_the_codec_s_with_room_for_headers_and_the_harness_makes_topics_alike() -> None:
    assert MAX_EVENT_BYTES < BROKER_DEFAULT < MAX_RELEASE_EVENT_BYTES < MAX_MESSAGE_BYTES
    assert kafka_secure.RELEASES_MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES


async def test_a_release_request_larger_than_a_reader_takes_is_refused_and_the_largest_that_fits_goes_whole(
    kafka_bootstrap: str,
) -> None:
    large = too_large()
    async with fresh_kafka_bus(kafka_bootstrap) as bus:
        with pytest.raises(InvalidInput) as refused:
            await bus.publish(ReleaseRequested(release_id=large.release_id, plan=large))
        assert refused.value.field == "plan.nodes"
        assert "30,000 nodes" in refused.value.rule
        count = fitting(refused.value)
        assert 20_000 < count < 30_000

        largest = fleet(count, "largest", url_bytes=1_100)
        assert MAX_RELEASE_EVENT_BYTES - 5_000 < size_of(largest) <= MAX_RELEASE_EVENT_BYTES  # a few nodes short
        await bus.publish(ReleaseRequested(release_id=largest.release_id, plan=largest))
        read = [decode(record)[0] for record in await bus.history(Topic.RELEASES)]
    assert [event.release_id for event in read] == ["largest"], "the refused request never reached the topic"
    assert isinstance(read[0], ReleaseRequested)
    assert read[0].plan.nodes == largest.nodes


async def test_a_topic_made_without_the_setting_refuses_the_request_until_topics_create_raises_it(
    kafka_bootstrap: str,
) -> None:
    """A releases topic at the broker's default 1 MiB (made by hand, or before this setting): the publish fails with
    an error naming the topic's setting and what sets it, not as an outage; `create_topics` then raises the setting
    and keeps the topic's other settings of its own."""
    plan = fleet(20_000, "twenty-thousand")
    assert BROKER_DEFAULT < size_of(plan) < MAX_RELEASE_EVENT_BYTES
    prefix = f"t{uuid4().hex[:10]}."
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    prefix + "releases",
                    num_partitions=1,
                    replication_factor=1,
                    topic_configs={"retention.ms": "3600000"},
                )
            ]
        )
        async with KafkaBus(kafka_bootstrap, prefix=prefix) as bus:
            with pytest.raises(Misconfigured, match=r"max\.message\.bytes.*reactor topics create"):
                await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
            created = await bus.create_topics(partitions=1)
            assert prefix + "releases" not in created
            [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, prefix + "releases")])
            values = {entry[0]: entry[1] for entry in described.resources[0][4]}
            assert values["max.message.bytes"] == str(MAX_MESSAGE_BYTES)
            assert values["retention.ms"] == "3600000", "the topic's own settings are kept"
            await bus.publish(ReleaseRequested(release_id=plan.release_id, plan=plan))
            read = [decode(record)[0] for record in await bus.history(Topic.RELEASES)]
    finally:
        await admin.close()
    assert [event.release_id for event in read] == [plan.release_id]


@pytest.mark.mongo
def test_submitting_a_release_too_large_for_the_bus_exits_invalid_and_sends_nothing(
    kafka_bootstrap: str, mongo_url: str, tmp_path: Path
) -> None:
    plan = too_large()
    file = tmp_path / "release.json"
    file.write_text(plan.model_dump_json())
    prefix = f"t{os.getpid()}large."
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": prefix,
        "REACTOR_MONGO_URL": mongo_url,
        "REACTOR_MONGO_DATABASE": "large_release",
        "REACTOR_REQUIRE_SIGNED": "false",
        "REACTOR_STATE_DIR": str(tmp_path / "state"),
    }
    submitted = subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", "release", "submit", str(file)],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip
    assert submitted.returncode == 2, submitted.stdout + submitted.stderr
    assert "invalid plan.nodes: the release request of 30,000 nodes is" in " ".join(submitted.stderr.split())
    assert "submitted" not in submitted.stdout


async def test_the_in_memory_bus_through_the_codec_refuses_it_as_kafka_does() -> None:
    """Embedded with signatures (every event through the codec): the same refusal, nothing appended."""
    large = too_large()
    async with MemoryBus(through_codec=True) as bus:
        with pytest.raises(InvalidInput, match="30,000 nodes"):
            await bus.publish(ReleaseRequested(release_id=large.release_id, plan=large))
        assert bus.events(Topic.RELEASES) == []
