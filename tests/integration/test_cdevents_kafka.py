"""CDEvents on a real Kafka broker: a release runs, the cdevents worker (its own consumer group) publishes to
`<prefix>cdevents`, and a plain CloudEvents subscriber receives service.deployed/upgraded/rolledback and the
pipelineRun events of the release, each valid against the official schema, each once after deduping by id, and a
re-emitted outcome again under the same id."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiokafka import AIOKafkaConsumer
from cloudevents.core.bindings import kafka as ce_kafka

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.cdevents import cdevent_id
from reactor.codec import decode
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState, pending
from reactor.events import NodeDeployed, NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.ports import ExecutorFactory
from reactor.runtime import Role
from reactor.settings import Settings
from tests.cdevents_schemas import check
from tests.conftest import fresh_kafka_bus
from tests.fakes import Script, scripted
from tests.support import equals, running, running_roles, until

pytestmark = pytest.mark.kafka

PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="d" * 64)
WAIT_S = 60.0
SERVICE_KINDS = ("deployed", "upgraded", "rolledback")
EXPECTED = sorted(
    f"dev.cdevents.{kind}.0.3.0"
    for kind in (
        "pipelinerun.queued",
        "pipelinerun.started",
        "service.deployed",
        "service.upgraded",
        "taskrun.finished",
        "service.rolledback",
        "pipelinerun.finished",
    )
)


class Subscriber:
    """A CDEvents subscriber on the topic: every CloudEvent it reads, and the CDEvents deduped by id."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []

    def take(self, message: Any) -> None:
        event = ce_kafka.from_binary_event(
            ce_kafka.KafkaMessage(headers=dict(message.headers), key=message.key, value=message.value)
        )
        cdevent = event.get_data()
        assert isinstance(cdevent, dict)
        check(cdevent)
        assert event.get_id() == cdevent["context"]["id"]
        assert event.get_type() == cdevent["context"]["type"]
        assert event.get_subject() == cdevent["subject"]["id"]
        assert message.key == cdevent["subject"]["id"].encode()
        self.received.append(cdevent)
        # A re-sent CDEvent is the same event: same id, same content.
        assert self.by_id.setdefault(event.get_id(), cdevent) == cdevent

    def types(self) -> list[str]:
        return sorted(cdevent["context"]["type"] for cdevent in self.by_id.values())


@contextlib.asynccontextmanager
async def subscribed(bootstrap: str, topic: str, subscriber: Subscriber) -> AsyncIterator[None]:
    """Read `topic` from its beginning into `subscriber`, as a consumer group of its own, while the block runs."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"subscriber-{uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()

    async def read() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                for message in messages:
                    try:
                        subscriber.take(message)
                    except AssertionError as exc:
                        subscriber.failures.append(f"{message.topic}@{message.offset}: {exc!r}")

    try:
        async with running(read()):
            yield
    finally:
        await consumer.stop()


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    async with fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.05, grace_s=2.0) as bus:
        yield bus


async def test_a_release_on_kafka_reaches_a_cdevents_subscriber_each_event_once_and_valid(
    kafka: KafkaBus, tmp_path: Path
) -> None:
    settings = Settings(
        mode="distributed",
        state_dir=tmp_path / "state",
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=kafka.prefix,
        topic_partitions=2,
        cdevents_release_url="https://reactor.example.test/releases/{release_id}",
        require_signed=False,  # the fixture's bus signs nothing (tests/integration/test_signed_commands.py signs)
    )
    script = Script(behaviour={"fake/host-02/app": "fail"})
    release = ReleasePlan(
        release_id="app-2",
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=f"fake/host-{index:02d}/app") for index in range(3)],
        strategy=Strategy(batches=["100%"], max_parallel=3, failure_budget=1),
    )
    subscriber = Subscriber()
    factories: dict[str, ExecutorFactory] = {"fake": scripted(script)}
    async with EmbeddedStore(":memory:") as store:
        for key in ("fake/host-01/app", "fake/host-02/app"):  # running 1.0.0 already; host-00 is new
            running = pending(key, "app").model_copy(update={"state": NodeState.SUCCESS, "current_version": "1.0.0"})
            assert await store.put_node(running, expected_revision=0) is not None
        async with (
            running_roles(kafka, store, settings, {Role.CDEVENTS}),
            subscribed(kafka.bootstrap, f"{kafka.prefix}cdevents", subscriber),
            running_roles(kafka, store, settings, {Role.ALL}, factories),
        ):
            await kafka.publish(ReleaseRequested(release_id=release.release_id, plan=release))
            await until(
                lambda: equals(_release_state(store, release.release_id), ReleaseState.COMPLETED),
                "the release completes",
                WAIT_S,
            )
            await until(
                lambda: subscriber.failures or subscriber.types() == EXPECTED,
                "the subscriber has every CDEvent",
                WAIT_S,
            )
            # A re-emitted outcome (a redelivered command re-emits its recorded outcome) maps to the same id.
            deployed = next(
                event
                for event in (decode(record)[0] for record in await kafka.history(Topic.OUTCOMES))
                if isinstance(event, NodeDeployed) and event.prev_version is None
            )
            seen = len(subscriber.received)
            await kafka.publish(deployed)
            await until(lambda: len(subscriber.received) > seen, "the subscriber gets the re-emitted one", WAIT_S)
    assert subscriber.received[-1]["context"]["id"] == cdevent_id(deployed.event_id)
    assert subscriber.failures == []  # every message a valid CDEvent in a well-formed CloudEvent
    assert subscriber.types() == EXPECTED  # each once by id: no type twice under two ids
    by_type = {cdevent["context"]["type"]: cdevent for cdevent in subscriber.by_id.values()}
    services = {
        kind: by_type[f"dev.cdevents.service.{kind}.0.3.0"]["subject"]
        for kind in ("deployed", "upgraded", "rolledback")
    }
    assert services["deployed"]["id"] == "fake/host-00/app"
    assert services["upgraded"]["id"] == "fake/host-01/app"
    assert services["rolledback"]["id"] == "fake/host-02/app"
    assert services["rolledback"]["content"]["artifactId"] == "pkg:generic/app@1.0.0"
    chains = {cdevent["context"]["chainId"] for cdevent in subscriber.by_id.values()}
    assert len(chains) == 1  # one release, one chain
    started = by_type["dev.cdevents.pipelinerun.started.0.3.0"]["subject"]
    assert started == {
        "id": "app-2",
        "content": {"pipelineName": "deploy-reactor release", "uri": "https://reactor.example.test/releases/app-2"},
    }


async def _release_state(store: EmbeddedStore, release_id: str) -> ReleaseState | None:
    record = await store.get_release(release_id)
    return None if record is None else record.state
