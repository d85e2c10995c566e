"""Enforcement of signed events on the in-memory bus and in the wiring: what is signed, what is refused, and the
settings that switch it on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reactor import runtime
from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import Record, encode
from reactor.errors import InvalidInput
from reactor.events import DeployRequested, Event, NodeDeployed, Package, ReleaseApproved, Topic
from reactor.runtime import Backends, Role, load_signatures, run_roles
from reactor.settings import Settings
from reactor.trust import Identity, SigningKey, TrustStore, enforcement, generate_key, sign_record, verify_record
from reactor.trust.enforcement import Signatures
from reactor.trust.signing import SignatureError

pytestmark = pytest.mark.unit

NODE = "local/node-1/app"
PACKAGE = Package(url="https://packages.example.com/app-2.0.0.tar.gz", sha256="a" * 64)


def _key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


def _deploy() -> DeployRequested:
    return DeployRequested(node_key=NODE, service="app", version="2.0.0", package=PACKAGE, actor="ci")


async def _delivered(bus: MemoryBus, topic: Topic) -> list[Event]:
    seen: list[Event] = []

    async def handle(event: Event) -> None:
        seen.append(event)

    task = asyncio.create_task(bus.consume([topic], "test", handle))
    await bus.idle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen


async def test_a_bus_with_a_key_signs_what_it_publishes() -> None:
    """What the bus carries verifies as signed by this process's key."""
    key = _key()
    trust = TrustStore([Identity.of("reactor", key.public_key, reactor=True)])
    async with MemoryBus(signatures=Signatures(key=key, trust=trust, required=True)) as bus:
        await bus.publish(NodeDeployed(node_key=NODE, service="app", version="2.0.0"))
        [record] = await bus.history(Topic.OUTCOMES)
    assert verify_record(record, trust).identity.name == "reactor"


@pytest.mark.parametrize(
    ("signer", "reason"),
    [
        (None, "signature: unsigned"),
        ("stranger", "signature: unknown key"),
        ("ci", "signature: not a reactor identity: 'ci'"),
    ],
)
async def test_a_node_command_not_signed_by_a_reactor_identity_is_dead_lettered_unhandled(
    signer: str | None, reason: str
) -> None:
    """Unsigned, signed by an unknown key, or by a trusted identity that is not the reactor's: dead-lettered."""
    keys = {"reactor": _key(), "ci": _key(), "stranger": _key()}
    trust = TrustStore(
        [Identity.of("reactor", keys["reactor"].public_key, reactor=True), Identity.of("ci", keys["ci"].public_key)]
    )
    record = encode(_deploy(), "/ci")
    if signer is not None:
        record = sign_record(record, keys[signer])
    async with MemoryBus(signatures=Signatures(key=keys["reactor"], trust=trust, required=True)) as bus:
        await bus.publish_raw(Topic.COMMANDS, record)
        assert await _delivered(bus, Topic.COMMANDS) == []
        [letter] = bus.records(Topic.DLQ)
    assert (letter.header(DLQ_REASON) or b"").decode().startswith(reason)


async def test_ci_may_sign_release_commands() -> None:
    """A trusted identity that is not the reactor's may still sign what is not a node command (an approval)."""
    ci = _key()
    trust = TrustStore([Identity.of("ci", ci.public_key)])
    approval = ReleaseApproved(release_id="app-2", actor="ci")
    async with MemoryBus(signatures=Signatures(trust=trust, required=True)) as bus:
        await bus.publish_raw(Topic.RELEASES, sign_record(encode(approval, "/ci"), ci))
        assert [event.event_id for event in await _delivered(bus, Topic.RELEASES)] == [approval.event_id]
        assert bus.records(Topic.DLQ) == []


async def test_without_required_signatures_an_unsigned_message_is_handled() -> None:
    """Signatures optional (embedded mode's default): nothing is checked."""
    async with MemoryBus() as bus:
        await bus.publish_raw(Topic.COMMANDS, encode(_deploy(), "/ci"))
        assert len(await _delivered(bus, Topic.COMMANDS)) == 1


def test_required_signatures_need_a_trust_file() -> None:
    """There is nothing to verify with: refused when the process starts, naming the setting."""
    with pytest.raises(InvalidInput, match="REACTOR_TRUST_FILE"):
        Signatures(required=True)


async def test_a_process_without_a_key_cannot_publish_when_signatures_are_required() -> None:
    """It would send messages every worker refuses: refused at once, naming REACTOR_SIGNING_KEY."""
    trust = TrustStore([Identity.of("ci", _key().public_key)])
    async with MemoryBus(signatures=Signatures(trust=trust, required=True)) as bus:
        with pytest.raises(InvalidInput, match="REACTOR_SIGNING_KEY"):
            await bus.publish(_deploy())


def test_signatures_are_required_by_default_in_distributed_mode_only() -> None:
    """Distributed: on unless switched off; embedded: off unless switched on."""
    assert Settings(mode="distributed").signatures_required()
    assert not Settings(mode="distributed", require_signed=False).signatures_required()
    assert not Settings(mode="embedded").signatures_required()
    assert Settings(mode="embedded", require_signed=True).signatures_required()


def test_load_signatures_reads_the_key_and_the_trust_file(tmp_path: Path) -> None:
    """REACTOR_SIGNING_KEY and REACTOR_TRUST_FILE as the settings name them."""
    key_id = generate_key("reactor", tmp_path)
    (tmp_path / "trust.yaml").write_text(
        yaml.safe_dump([{"name": "reactor", "public_key": "reactor.pub", "reactor": True}])
    )
    settings = Settings(mode="distributed", signing_key=tmp_path / "reactor.key", trust_file=tmp_path / "trust.yaml")
    signatures = load_signatures(settings)
    assert signatures.required
    assert signatures.key is not None
    assert signatures.key.key_id == key_id
    assert signatures.trust is not None
    assert [identity.name for identity in signatures.trust] == ["reactor"]


def test_embedded_mode_warns_once_that_nothing_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """One clear warning per process, however often the backends open."""
    monkeypatch.setattr(runtime, "_warned_unsigned", False)
    with structlog.testing.capture_logs() as logs:
        load_signatures(Settings(mode="embedded"))
        load_signatures(Settings(mode="embedded"))
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "REACTOR_REQUIRE_SIGNED" in warnings[0]["event"]


async def test_a_worker_without_a_signing_key_is_refused_before_it_takes_anything(tmp_path: Path) -> None:
    """Signatures required and no key: the worker would derive commands no one accepts; it does not start."""
    key = _key()
    trust = TrustStore([Identity.of("reactor", key.public_key, reactor=True)])
    settings = Settings(mode="embedded", require_signed=True, state_dir=tmp_path)
    async with (
        MemoryBus(signatures=Signatures(trust=trust, required=True)) as bus,
        EmbeddedStore(tmp_path / "db") as store,
    ):
        with pytest.raises(InvalidInput, match="REACTOR_SIGNING_KEY"):
            await run_roles(Backends(bus=bus, store=store, memory_bus=bus), settings, {Role.ALL})


async def test_with_signatures_required_the_memory_bus_signs_and_verifies_every_event_as_kafka_would() -> None:
    """Embedded mode switched on: an in-process event is encoded, signed, verified and decoded on its way."""
    key = _key()
    trust = TrustStore([Identity.of("reactor", key.public_key, reactor=True)])
    deploy = _deploy()
    async with MemoryBus(signatures=Signatures(key=key, trust=trust, required=True)) as bus:
        await bus.publish(deploy)
        [handled] = await _delivered(bus, Topic.COMMANDS)
        [record] = bus.records(Topic.COMMANDS)
    assert handled == deploy
    assert handled is not deploy  # it went through the codec
    assert verify_record(record, trust).identity.name == "reactor"


def test_a_record_checked_again_is_not_verified_again_but_any_changed_byte_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consumer groups of one process share the verification of the same record; a record that differs in any
    header or in its value is verified on its own, and one that does not verify is never remembered."""

    reactor_key = _key()
    signatures = Signatures(
        trust=TrustStore([Identity.of("reactor", reactor_key.public_key, reactor=True)]), required=True
    )
    calls: list[Record] = []

    def counting(record: Record, trust: TrustStore) -> object:
        calls.append(record)
        return verify_record(record, trust)

    monkeypatch.setattr(enforcement, "verify_record", counting)
    record = sign_record(encode(_deploy(), "/reactor"), reactor_key)
    first = signatures.check(record)
    again = signatures.check(Record(record.key, bytes(record.value), tuple(record.headers)))
    assert first == again
    assert first is not None
    assert first.identity.name == "reactor"
    assert len(calls) == 1

    tampered = Record(record.key, record.value.replace(b"2.0.0", b"2.0.1"), record.headers)
    renamed = Record(
        record.key,
        record.value,
        tuple((name, value + b"x") if name == "ce_source" else (name, value) for name, value in record.headers),
    )
    for changed in (tampered, renamed, tampered):
        with pytest.raises(SignatureError, match="signature: tampered"):
            signatures.check(changed)
    assert len(calls) == 4


def test_what_a_process_signs_with_a_trusted_key_it_takes_as_verified_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Signed here with a key the trust file holds: read back byte for byte, it is not verified again. Any change
    after signing is verified (and refused); a key the trust file does not hold is remembered as nothing."""
    reactor_key, stranger = _key(), _key()
    trust = TrustStore([Identity.of("reactor", reactor_key.public_key, reactor=True)])
    calls: list[Record] = []

    def counting(record: Record, trusted: TrustStore) -> object:
        calls.append(record)
        return verify_record(record, trusted)

    monkeypatch.setattr(enforcement, "verify_record", counting)
    signatures = Signatures(key=reactor_key, trust=trust, required=True)
    signed = signatures.sign(encode(_deploy(), "/reactor"))
    verified = signatures.check(Record(signed.key, bytes(signed.value), tuple(signed.headers)))
    assert verified is not None
    assert verified == verify_record(signed, trust)
    assert calls == []  # taken from what it signed, not verified again
    with pytest.raises(SignatureError, match="signature: tampered"):
        signatures.check(Record(signed.key, signed.value.replace(b"2.0.0", b"2.0.1"), signed.headers))

    untrusted = Signatures(key=stranger, trust=trust, required=True)
    foreign = untrusted.sign(encode(_deploy(), "/reactor"))
    with pytest.raises(SignatureError, match="signature: unknown key"):
        untrusted.check(foreign)
