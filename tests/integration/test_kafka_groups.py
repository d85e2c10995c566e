"""Consumer groups on the real broker are the deployment's own: two deployments under prefixes of their own share no
group, so one's workers joining or leaving never rebalances the other's and each commits only its own topics; an
empty group prefix keeps the bare role names workers joined before group prefixes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from reactor.adapters.kafka_bus import KafkaBus
from reactor.events import DeployRequested, Event, Topic
from tests.support import running, until

pytestmark = pytest.mark.kafka

TIMEOUT_S = 60.0  # a bound for failures only


async def committed_topics(bootstrap: str, group: str) -> set[str]:
    """The topics Kafka holds committed offsets of for consumer group `group`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.topic for tp, found in offsets.items() if found.offset >= 0}


async def until_committed(bootstrap: str, group: str, topics: set[str], *, exactly: bool = True) -> None:
    """Wait until `group` has committed offsets of `topics` (and of no other topic, if `exactly`)."""
    last: set[str] = set()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while not (
                (last := await committed_topics(bootstrap, group)) == topics or (not exactly and topics <= last)
            ):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"group {group} committed offsets of {sorted(last)}, not {sorted(topics)}") from None


@contextlib.asynccontextmanager
async def consuming(bus: KafkaBus, seen: list[str]) -> AsyncIterator[None]:
    """`bus` consuming its commands as role group `executor`, each command's node key appended to `seen`."""

    async def handle(event: Event) -> None:
        assert isinstance(event, DeployRequested)
        seen.append(event.node_key)

    async with running(bus.consume([Topic.COMMANDS], "executor", handle)):
        yield


def command(node_key: str) -> DeployRequested:
    return DeployRequested(node_key=node_key, service="app", version="1.0.0", image="registry.local/app:1.0.0")


async def test_two_deployments_on_one_cluster_share_no_consumer_group(kafka_bootstrap: str) -> None:
    """Two deployments, prefixes `a` and `b`, each with an executor: each group is `<prefix>executor`, takes its own
    deployment's command and commits offsets of its own commands topic only (one shared group `executor`, as
    before, held both deployments' offsets and rebalanced both whenever either's workers came or went)."""
    run = uuid4().hex[:8]
    a_seen: list[str] = []
    b_seen: list[str] = []
    async with (
        KafkaBus(kafka_bootstrap, prefix=f"a{run}.", commit_interval_s=0.05) as a,
        KafkaBus(kafka_bootstrap, prefix=f"b{run}.", commit_interval_s=0.05) as b,
    ):
        await a.create_topics(partitions=1)
        await b.create_topics(partitions=1)
        assert (a.group_id("executor"), b.group_id("executor")) == (f"a{run}.executor", f"b{run}.executor")
        await a.publish(command("noop/a-1/app"))
        await b.publish(command("noop/b-1/app"))
        async with consuming(a, a_seen), consuming(b, b_seen):
            await until(lambda: a_seen and b_seen, "each deployment's executor took its command", TIMEOUT_S)
            await until_committed(kafka_bootstrap, f"a{run}.executor", {f"a{run}.commands"})
            await until_committed(kafka_bootstrap, f"b{run}.executor", {f"b{run}.commands"})
    assert (a_seen, b_seen) == (["noop/a-1/app"], ["noop/b-1/app"])


async def test_an_empty_group_prefix_keeps_the_bare_role_names(kafka_bootstrap: str) -> None:
    """REACTOR_GROUP_PREFIX empty: the executor group is `executor`, as workers from before group prefixes joined,
    so their committed offsets are where an upgraded worker reads on from."""
    prefix = f"l{uuid4().hex[:8]}."
    seen: list[str] = []
    async with KafkaBus(kafka_bootstrap, prefix=prefix, group_prefix="", commit_interval_s=0.05) as bus:
        await bus.create_topics(partitions=1)
        assert bus.group_id("executor") == "executor"
        await bus.publish(command("noop/legacy-1/app"))
        async with consuming(bus, seen):
            await until_committed(kafka_bootstrap, "executor", {f"{prefix}commands"}, exactly=False)
        assert f"{prefix}commands" not in await committed_topics(kafka_bootstrap, f"{prefix}executor")
    assert seen == ["noop/legacy-1/app"]
