"""The contract on a real broker, from a non-Python producer: messages generated from schemas/ and sent with kcat
(librdkafka) get exactly one outcome each when valid and land in the dead-letter topic with a reason when not; and
one node's commands sent through two partitioners (kcat's default and the reactor's murmur2) run one at a time."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.partitioner import murmur2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.codec import decode, encode, matches
from reactor.events import EVENT_ID, DeployRequested, NodeDeployed, Package, Topic
from reactor.runtime import Role
from reactor.settings import Settings
from tests.conftest import fresh_kafka_bus
from tests.contract import Message, mutated, valid_messages, verdict
from tests.fakes import Script, scripted
from tests.support import running_roles, until

pytestmark = pytest.mark.kafka

COMMANDS = ["dev.deployreactor.node.deploy.requested.v1", "dev.deployreactor.node.rollback.requested.v1"]
TRACE = "x-contract-test"  # not a ce_* header: ignored by the codec, kept in the dead-letter copy
PARTITIONS = 4
WAIT_S = 90.0
ENVELOPE = {"event_id", "occurred_at", "release_id", "causation_id"}  # attributes, not body fields


def kcat() -> str:
    path = shutil.which("kcat")
    if path is None:
        pytest.fail("kcat is not installed (scripts/test installs Debian's kcat)")
    return path


def send_with_kcat(bootstrap: str, topic: str, message: Message, tmp_path: Path, partitioner: str) -> None:
    """Publish one message with kcat: its key, its headers and its body as one file (one message)."""
    body = tmp_path / "body.json"
    body.write_bytes(message.value())
    command = [kcat(), "-P", "-b", bootstrap, "-t", topic, "-X", f"topic.partitioner={partitioner}"]
    if message.key is not None:
        command += ["-k", message.key]
    for name, value in message.headers.items():
        command += ["-H", f"{name}={value}"]
    subprocess.run([*command, str(body)], check=True, timeout=30, capture_output=True)


def sample(count: int) -> list[Message]:
    """`count` commands drawn from schemas/ (valid and changed ones, about half each), in a fixed order."""
    drawn: list[Message] = []
    kinds = st.sampled_from(COMMANDS).flatmap(
        lambda event_type: st.one_of(valid_messages(event_type, live=True), mutated(event_type, live=True))
    )

    @settings(
        max_examples=count,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(kinds)
    def collect(message: Message) -> None:
        drawn.append(message)

    collect()
    return drawn


@pytest.mark.timeout(600)  # drawing the sample from the schemas takes minutes on a loaded machine
async def test_commands_generated_from_the_schemas_and_sent_with_kcat_get_one_outcome_or_a_dead_letter(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Valid commands: exactly one outcome each; invalid ones: each in `dlq` once, with a reason naming the field."""
    messages = sample(40)
    # Every command its own id (drawn ids repeat, and a repeated id is a redelivery, answered again by design);
    # an id the test means to break stays as drawn.
    traced = [
        Message(
            message.type,
            message.key,
            message.body,
            {
                **message.headers,
                **({"ce_id": f"contract-{index}"} if matches(EVENT_ID, message.headers.get("ce_id", "")) else {}),
                TRACE: str(index),
            },
        )
        for index, message in enumerate(messages)
    ]
    expected = {message.headers[TRACE]: verdict(message) for message in traced}
    valid = {message.headers["ce_id"] for message in traced if expected[message.headers[TRACE]].accepted}
    invalid = {trace for trace, result in expected.items() if not result.accepted}
    assert valid, "the sample holds valid commands"
    assert invalid, "the sample holds invalid commands"
    async with (
        fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.05, grace_s=2.0) as bus,
        EmbeddedStore(":memory:") as store,
        running_roles(
            bus, store, Settings(state_dir=tmp_path / "state"), {Role.EXECUTOR}, {"fake": scripted(Script())}
        ),
    ):
        for message in traced:
            send_with_kcat(kafka_bootstrap, bus.topic_name(Topic.COMMANDS), message, tmp_path, "murmur2_random")

        async def settled() -> bool:
            outcomes = [decode(record)[0] for record in await bus.history(Topic.OUTCOMES)]
            letters = await bus.history(Topic.DLQ)
            answered = {outcome.causation_id for outcome in outcomes}
            return valid <= answered and len(letters) >= len(invalid)

        await until(settled, "every valid command answered and every invalid one dead-lettered", WAIT_S)
        outcomes = [decode(record)[0] for record in await bus.history(Topic.OUTCOMES)]
        letters = await bus.history(Topic.DLQ)
    per_command = Counter(outcome.causation_id for outcome in outcomes)
    assert set(per_command) == valid, "an outcome for every valid command and for nothing else"
    assert set(per_command.values()) == {1}, f"exactly one outcome per command: {per_command.most_common(3)}"
    by_trace: dict[str, list[str]] = {}
    for letter in letters:
        trace, reason = letter.header(TRACE), letter.header(DLQ_REASON)
        assert trace is not None, letter
        assert reason is not None, letter
        by_trace.setdefault(trace.decode(), []).append(reason.decode())
    assert set(by_trace) == invalid, "every invalid command is dead-lettered, and only those"
    for traced_id, reasons in by_trace.items():
        assert len(reasons) == 1, f"dead-lettered once: {reasons}"
        names = expected[traced_id].names
        assert any(name in reasons[0] for name in names), f"{reasons[0]!r} names none of {sorted(names)}"


def misrouted_key() -> str:
    """A node key that librdkafka's default partitioner (consistent_random: CRC32) puts on another partition than
    the Java default partitioner (murmur2) does, for a topic of PARTITIONS partitions."""
    for index in range(100):
        key = f"fake/host-{index:02d}/app"
        if zlib.crc32(key.encode()) % PARTITIONS != (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS:
            return key
    raise AssertionError("no key found")


async def test_one_node_s_commands_through_two_partitioners_run_one_at_a_time_each_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A producer that ignores the murmur2 rule (kcat's default) puts a node's command on another partition; the
    worker notices, still runs it only after the node's running command finished, and each runs exactly once.

    One worker keeps a key's messages in one lane whatever their partition; across workers the node's claim in the
    store refuses a second request while the first holds it (NodeBusy, retried), covered by the consumer tests.
    """
    key = misrouted_key()
    package = Package(url="https://packages.example.test/app.tar.gz", sha256="e" * 64)
    first = DeployRequested(node_key=key, service="app", version="1.0.0", package=package)
    second = DeployRequested(node_key=key, service="app", version="2.0.0", package=package)
    script = Script(latched=True)
    async with (
        fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.05, grace_s=2.0) as bus,
        EmbeddedStore(":memory:") as store,
        running_roles(bus, store, Settings(state_dir=tmp_path / "state"), {Role.EXECUTOR}, {"fake": scripted(script)}),
    ):
        await bus.publish(first)  # the reactor's own producer: murmur2
        await until(lambda: script.held == [key], "the first deploy runs and is held")
        record = encode(second, "/ci/other-producer")
        headers = {name: value.decode() for name, value in record.headers}
        message = Message(second.TYPE, key, second.model_dump(mode="json", exclude=ENVELOPE), headers)
        send_with_kcat(kafka_bootstrap, bus.topic_name(Topic.COMMANDS), message, tmp_path, "consistent_random")
        await until(lambda: bus.misrouted >= 1, "the worker took the second command and noticed its partition")
        assert script.calls == Counter({f"deploy:{key}": 1}), "the second deploy waits while the first runs"
        assert script.let_go() == [key]
        await until(lambda: script.held == [key], "the second deploy runs once the first finished")
        assert script.let_go() == [key]

        async def both_answered() -> bool:
            deployed = [decode(record)[0] for record in await bus.history(Topic.OUTCOMES)]
            return len(deployed) >= 2

        await until(both_answered, "both outcomes", WAIT_S)
        outcomes = [decode(record)[0] for record in await bus.history(Topic.OUTCOMES)]
        node = await store.get_node(key)
    assert script.peak_in_flight == 1, "never two runs of the node at once"
    assert script.calls == Counter({f"deploy:{key}": 2})
    assert sorted((event.causation_id, event.version) for event in outcomes if isinstance(event, NodeDeployed)) == (
        sorted([(first.event_id, "1.0.0"), (second.event_id, "2.0.0")])
    )
    assert node is not None
    assert (node.current_version, node.prev_version) == ("2.0.0", "1.0.0")
