"""Signed commands on a real Kafka broker: a worker with REACTOR_REQUIRE_SIGNED on sends every forged, tampered or
replayed DeployRequested, published straight to `commands` with a raw aiokafka producer, to `dlq` with its
`signature:` reason, and its `local` node (its record and the version its service answers with) stays as it was;
a release CI signed completes, and every command and outcome the reactor derives verifies as the reactor's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from subprocess import PIPE
from typing import Any
from uuid import uuid4

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.codec import Record, decode, encode
from reactor.demo import BuiltPackage, build_package
from reactor.demo.scenario import free_ports, release_plan, served_version
from reactor.domain.status import NodeState, NodeStatus
from reactor.events import (
    DeployRequested,
    Event,
    NodeDeployed,
    Package,
    ReleaseCompleted,
    ReleaseHalted,
    ReleaseRequested,
    Topic,
    new_event_id,
    utc_now,
)
from reactor.executors.local import stop_all
from reactor.runtime import Role, kafka_bus, load_signatures
from reactor.settings import Settings
from reactor.trust import SigningKey, generate_key, load_signing_key, load_trust_file, sign_record, verify_record
from tests.support import running_roles

pytestmark = pytest.mark.kafka

NODE = "local/node-1/hello"
WAIT_S = 90.0
PARTITIONS = 4


@dataclass(frozen=True)
class Keys:
    """The reactor's key (a reactor identity), CI's (trusted, not a reactor identity), a stranger's (not trusted)."""

    directory: Path
    reactor: SigningKey
    ci: SigningKey
    stranger: SigningKey

    @property
    def trust_file(self) -> Path:
        return self.directory / "trust.yaml"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    directory = tmp_path / "keys"
    for name in ("reactor", "ci", "stranger"):
        generate_key(name, directory)
    identities = [
        {"name": "reactor", "public_key": "reactor.pub", "reactor": True},
        {"name": "ci", "public_key": "ci.pub"},
    ]
    (directory / "trust.yaml").write_text(yaml.safe_dump(identities))
    reactor, ci, stranger = (load_signing_key(directory / f"{name}.key") for name in ("reactor", "ci", "stranger"))
    return Keys(directory, reactor, ci, stranger)


@dataclass
class Reactor:
    """A worker running every role with signatures required; its `local` node runs 1.0.0, deployed by a release."""

    settings: Settings
    bus: KafkaBus  # the worker's: signs with the reactor key, checks every message it takes
    ci: KafkaBus  # CI's: signs with the CI key
    store: EmbeddedStore
    port: int
    packages: dict[str, BuiltPackage]
    first_release: Event

    async def node(self) -> NodeStatus | None:
        return await self.store.get_node(NODE)

    def deploy(self, version: str, **changes: Any) -> DeployRequested:
        """A direct deploy of a built package to the node."""
        package = self.packages[version]
        fields: dict[str, Any] = {
            "node_key": NODE,
            "service": "hello",
            "version": version,
            "package": Package(url=package.url, sha256=package.sha256),
            "port": self.port,
            "auto_rollback": "none",
            "actor": "ci",
        }
        return DeployRequested.model_validate({**fields, **changes})


async def run_release(bus: KafkaBus, submitter: KafkaBus, request: ReleaseRequested) -> Event:
    """Publish a release through `submitter`; how it ended (ReleaseCompleted or ReleaseHalted), read off `releases`."""
    ended: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    async def watch(event: Event) -> None:
        ending = isinstance(event, ReleaseCompleted | ReleaseHalted) and event.release_id == request.release_id
        if ending and not ended.done():
            ended.set_result(event)

    watcher = asyncio.create_task(bus.consume([Topic.RELEASES], f"watch-{uuid4().hex[:8]}", watch))
    try:
        await submitter.publish(request)
        async with asyncio.timeout(WAIT_S):
            return await ended
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


@pytest.fixture
async def reactor(kafka_bootstrap: str, keys: Keys, tmp_path: Path) -> AsyncIterator[Reactor]:
    settings = Settings(
        mode="distributed",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"s{uuid4().hex[:10]}.",
        signing_key=keys.directory / "reactor.key",
        trust_file=keys.trust_file,
        state_dir=tmp_path / "state",
        local_root=tmp_path / "nodes",
        require_signed=None,  # the distributed mode's default: on
    )
    assert settings.signatures_required()
    ci_settings = settings.model_copy(update={"signing_key": keys.directory / "ci.key"})
    packages = {version: build_package(tmp_path / "dist", version) for version in ("1.0.0", "2.0.0", "6.6.6")}
    [port] = free_ports(1)
    async with (
        kafka_bus(settings, load_signatures(settings)) as bus,
        kafka_bus(ci_settings, load_signatures(ci_settings)) as ci,
        EmbeddedStore(tmp_path / "reactor.db") as store,
    ):
        await bus.create_topics(partitions=PARTITIONS)
        try:
            async with running_roles(bus, store, settings, {Role.ALL}):
                plan = release_plan("hello-1.0.0", packages["1.0.0"], {"node-1": port})
                ended = await run_release(bus, ci, ReleaseRequested(release_id=plan.release_id, plan=plan, actor="ci"))
                yield Reactor(settings, bus, ci, store, port, packages, ended)
        finally:
            stop_all(tmp_path / "nodes")


@contextlib.asynccontextmanager
async def raw_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def forge(reactor: Reactor, record: Record) -> tuple[Topic, Record]:
    """Publish `record` straight to `commands` with a raw producer; the first answer to it: its dead letter on `dlq`,
    or an outcome it caused on `outcomes` (what a worker that acted on it would emit)."""
    bus = reactor.bus
    event_id = record.header("ce_id")
    assert event_id is not None
    watched = {bus.topic_name(Topic.DLQ): Topic.DLQ, bus.topic_name(Topic.OUTCOMES): Topic.OUTCOMES}
    consumer = AIOKafkaConsumer(bootstrap_servers=bus.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(name, partition) for name in watched for partition in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)  # fixed now: only what comes after the forged message is read
        async with raw_producer(bus.bootstrap) as producer:
            await producer.send_and_wait(
                bus.topic_name(Topic.COMMANDS), value=record.value, key=record.key, headers=list(record.headers)
            )
        async with asyncio.timeout(WAIT_S):
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, messages in batch.items():
                    for message in messages:
                        found = Record(message.key, message.value or b"", tuple(message.headers or ()))
                        topic = watched[tp.topic]
                        if topic == Topic.DLQ and found.header("ce_id") == event_id:
                            return topic, found
                        if topic == Topic.OUTCOMES and found.header("ce_causationid") == event_id:
                            return topic, found
    finally:
        await consumer.stop()


async def assert_refused_and_node_unchanged(reactor: Reactor, record: Record, reason: str) -> None:
    """`record` goes to `dlq` with a reason starting `reason`; no outcome; the node's record and service unchanged."""
    before = await reactor.node()
    assert before is not None
    assert (before.state, before.current_version) == (NodeState.SUCCESS, "1.0.0")
    assert served_version(reactor.port) == "1.0.0"
    topic, answer = await forge(reactor, record)
    assert topic == Topic.DLQ, f"a worker acted on the forged command: {decode(answer)[0]!r}"
    dead_letter_reason = (answer.header(DLQ_REASON) or b"").decode()
    assert dead_letter_reason.startswith(reason), dead_letter_reason
    assert await reactor.node() == before
    assert served_version(reactor.port) == "1.0.0"


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def reactor_cli(reactor: Reactor, keys: Keys, *args: str) -> Completed:
    """Run the `reactor` CLI against the worker's topics with the trust file (and no signing key)."""
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        "REACTOR_KAFKA_BOOTSTRAP": reactor.settings.kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": reactor.settings.topic_prefix,
        "REACTOR_TRUST_FILE": str(keys.trust_file),
        "REACTOR_STATE_DIR": str(reactor.settings.state_dir),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reactor.cli.main", *args, env=env, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


def tampered(record: Record, change: dict[str, Any]) -> Record:
    """`record` with fields of its JSON body changed after it was signed."""
    body = json.loads(record.value)
    body.update(change)
    return Record(record.key, json.dumps(body).encode(), record.headers)


async def test_a_release_signed_by_ci_completes_and_everything_the_reactor_derives_is_signed_by_it(
    reactor: Reactor, keys: Keys
) -> None:
    """The release CI signed runs; every command and outcome verifies as the reactor's; `reactor verify` agrees."""
    assert isinstance(reactor.first_release, ReleaseCompleted)
    assert served_version(reactor.port) == "1.0.0"
    trust = load_trust_file(keys.trust_file)
    commands = await reactor.bus.history(Topic.COMMANDS)
    outcomes = await reactor.bus.history(Topic.OUTCOMES)
    assert [type(decode(record)[0]) for record in commands] == [DeployRequested]
    assert [type(decode(record)[0]) for record in outcomes] == [NodeDeployed]
    for record in (*commands, *outcomes):
        assert verify_record(record, trust).identity.name == "reactor"
    releases = await reactor.bus.history(Topic.RELEASES)
    signers = [verify_record(record, trust).identity.name for record in releases]
    assert signers[0] == "ci"
    assert set(signers[1:]) == {"reactor"}
    result = await reactor_cli(reactor, keys, "verify", "--topic", "outcomes", "--output", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["total"], document["verified"]) == (1, 1)
    assert document["records"][0]["signer"] == "reactor"


async def test_an_unsigned_deploy_goes_to_the_dead_letters_and_verify_reports_it(reactor: Reactor, keys: Keys) -> None:
    """No signature: refused before it is decoded; `reactor verify --topic commands` exits 1 naming it."""
    forged = encode(reactor.deploy("2.0.0"), "/ci")
    await assert_refused_and_node_unchanged(reactor, forged, "signature: unsigned")
    result = await reactor_cli(reactor, keys, "verify", "--topic", "commands")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 of 2 messages on commands verified" in result.stdout
    assert "UNVERIFIED signature: unsigned" in result.stdout


async def test_a_deploy_signed_by_an_unknown_key_goes_to_the_dead_letters(reactor: Reactor, keys: Keys) -> None:
    """A key the trust file does not list signs nothing that counts."""
    forged = sign_record(encode(reactor.deploy("2.0.0"), "/ci"), keys.stranger)
    await assert_refused_and_node_unchanged(reactor, forged, "signature: unknown key")


async def test_a_deploy_signed_by_ci_goes_to_the_dead_letters(reactor: Reactor, keys: Keys) -> None:
    """CI is trusted to submit releases, not to sign node commands: only a reactor identity may."""
    forged = sign_record(encode(reactor.deploy("2.0.0"), "/ci"), keys.ci)
    await assert_refused_and_node_unchanged(reactor, forged, "signature: not a reactor identity: 'ci'")


@pytest.mark.parametrize("field", ["version", "package"])
async def test_a_deploy_tampered_after_signing_goes_to_the_dead_letters(
    reactor: Reactor, keys: Keys, field: str
) -> None:
    """A reactor-signed deploy whose version, or package URL and SHA256, were changed on the way."""
    signed = sign_record(encode(reactor.deploy("2.0.0"), "/reactor"), keys.reactor)
    evil = reactor.packages["6.6.6"]
    change = {"version": "6.6.6"} if field == "version" else {"package": {"url": evil.url, "sha256": evil.sha256}}
    await assert_refused_and_node_unchanged(reactor, tampered(signed, change), "signature: tampered")


async def test_a_signed_command_replayed_under_a_new_id_goes_to_the_dead_letters(reactor: Reactor) -> None:
    """The reactor's own DeployRequested, sent again with a fresh ce_id so deduplication would not catch it: the
    signature covers the id."""
    [original] = await reactor.bus.history(Topic.COMMANDS)
    headers = tuple((name, new_event_id().encode() if name == "ce_id" else value) for name, value in original.headers)
    replayed = Record(original.key, original.value, headers)
    await assert_refused_and_node_unchanged(reactor, replayed, "signature: tampered")


async def test_a_deploy_signed_by_the_reactor_two_days_ago_goes_to_the_dead_letters(
    reactor: Reactor, keys: Keys
) -> None:
    """A valid reactor-signed command, never run, but older than REACTOR_COMMAND_MAX_AGE_S (a day by default): a
    message kept on the topic or replayed from the log that long changes no host."""
    old = reactor.deploy("2.0.0", occurred_at=utc_now() - timedelta(days=2))
    stale = sign_record(encode(old, "/reactor"), keys.reactor)
    await assert_refused_and_node_unchanged(reactor, stale, "policy: stale command")


async def test_a_deploy_signed_by_the_reactor_runs(reactor: Reactor, keys: Keys) -> None:
    """The control: the same raw path with a valid reactor signature deploys, so the refusals above are the check's."""
    command = sign_record(encode(reactor.deploy("2.0.0"), "/reactor"), keys.reactor)
    topic, answer = await forge(reactor, command)
    assert topic == Topic.OUTCOMES, (answer.header(DLQ_REASON) or b"").decode()
    assert isinstance(decode(answer)[0], NodeDeployed)
    assert served_version(reactor.port) == "2.0.0"
