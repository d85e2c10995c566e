"""A release too large for one message on the bus is refused before anything is sent, naming its nodes and how
many of them fit; the largest that fits goes through the real broker and is read back whole.

The case that matters lies between the two limits: a message the broker takes (under its 1 MiB default) but every
reader refuses (over the codec's MAX_EVENT_BYTES), which, once sent, was only ever dead-lettered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import MAX_EVENT_BYTES, decode, encode
from reactor.errors import InvalidInput
from reactor.events import NodeTarget, ReleasePlan, ReleaseRequested, Strategy, Topic
from tests.conftest import fresh_kafka_bus
from tests.pacing import PACKAGE

pytestmark = pytest.mark.kafka

BROKER_LIMIT = 1_048_576  # the producer's and the broker's default message size


def fleet(count: int, release_id: str) -> ReleasePlan:
    return ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:05d}/app") for index in range(count)],
        strategy=Strategy(batches=[1, "10%"], max_parallel=50),
    )


def between_the_limits() -> ReleasePlan:
    """A release whose request the broker would take and every reader would refuse."""
    plan = fleet(8_400, "too-large")
    size = len(encode(ReleaseRequested(release_id=plan.release_id, plan=plan), "/reactor").value)
    assert MAX_EVENT_BYTES < size < BROKER_LIMIT, size
    return plan


def fitting(refused: InvalidInput) -> int:
    found = re.search(r"about ([\d,]+) of these nodes fit", refused.rule)
    assert found is not None, refused.rule
    return int(found.group(1).replace(",", ""))


async def test_a_release_request_larger_than_a_reader_takes_is_refused_before_it_is_sent(
    kafka_bootstrap: str,
) -> None:
    large = between_the_limits()
    async with fresh_kafka_bus(kafka_bootstrap) as bus:
        with pytest.raises(InvalidInput) as refused:
            await bus.publish(ReleaseRequested(release_id=large.release_id, plan=large))
        assert refused.value.field == "plan.nodes"
        assert "8,400 nodes" in refused.value.rule
        count = fitting(refused.value)
        assert 7_000 < count < 8_400

        largest = fleet(count, "largest")
        await bus.publish(ReleaseRequested(release_id=largest.release_id, plan=largest))
        read = [decode(record)[0] for record in await bus.history(Topic.RELEASES)]
    assert [event.release_id for event in read] == ["largest"], "the refused request never reached the topic"
    assert isinstance(read[0], ReleaseRequested)
    assert read[0].plan.nodes == largest.nodes


@pytest.mark.mongo
def test_submitting_a_release_too_large_for_the_bus_exits_invalid_and_sends_nothing(
    kafka_bootstrap: str, mongo_url: str, tmp_path: Path
) -> None:
    plan = between_the_limits()
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
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert submitted.returncode == 2, submitted.stdout + submitted.stderr
    assert "invalid plan.nodes: the release request of 8,400 nodes is" in " ".join(submitted.stderr.split())
    assert "submitted" not in submitted.stdout


async def test_the_in_memory_bus_through_the_codec_refuses_it_as_kafka_does() -> None:
    """Embedded with signatures (every event through the codec): the same refusal, nothing appended."""
    large = between_the_limits()
    async with MemoryBus(through_codec=True) as bus:
        with pytest.raises(InvalidInput, match="8,400 nodes"):
            await bus.publish(ReleaseRequested(release_id=large.release_id, plan=large))
        assert bus.events(Topic.RELEASES) == []
