"""Commands sent over the HTTP API reach the workers signed as the token's identity, not the server's.

Every role runs on the in-memory bus with signatures required and a deploy policy (four-eyes approvals): the bus
verifies every message as a Kafka consumer does, so what the API publishes is judged by who signed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from reactor.adapters.dispatch import DLQ_REASON
from reactor.api.app import Api, create_app
from reactor.api.auth import digest, load_tokens
from reactor.api.feed import Feed
from reactor.codec import Record, encode
from reactor.domain.pacer import ReleaseState
from reactor.errors import InvalidInput
from reactor.events import NodeTarget, Package, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.session import Session, embedded
from reactor.settings import Settings
from reactor.trust import generate_key, load_signing_key, load_trust_file
from reactor.trust.signing import MATERIAL_HEADER, sign_record, verify_record
from tests.support import FOUR_EYES_POLICY, PACKAGES

pytestmark = pytest.mark.unit

NAMES = ("reactor", "ci", "alice", "mallory")
# Bearer tokens by identity; `viewer` may only read and has no key.
TOKENS = {"ci": "ci-token-1", "alice": "alice-token-1", "viewer": "viewer-token-1"}


@dataclass
class Reactor:
    client: httpx.AsyncClient
    session: Session
    keys: Path

    def auth(self, name: str, **headers: str) -> dict[str, str]:
        return {"authorization": f"Bearer {TOKENS[name]}", **headers}

    def dead_letters(self) -> list[tuple[str, str]]:
        """(subject, reason) of every dead letter so far."""
        return [
            ((record.header("ce_subject") or b"").decode(), (record.header(DLQ_REASON) or b"").decode())
            for record in self.session.bus.records(Topic.DLQ)
        ]

    def signers(self, topic: Topic) -> list[tuple[str, str]]:
        """(ce_type, verified signer) of every message of `topic`, checked against the trust file."""
        trust = load_trust_file(self.keys / "trust.yaml")
        return [
            ((record.header("ce_type") or b"").decode(), verify_record(record, trust).identity.name)
            for record in self.session.bus.records(topic)
        ]


def _keys(tmp_path: Path) -> Path:
    """A key per name; the trust file holds every one but mallory's, reactor's as a reactor identity."""
    keys = tmp_path / "keys"
    for name in NAMES:
        generate_key(name, keys)
    trust = [
        {"name": name, "public_key": f"{name}.pub", "reactor": name == "reactor"} for name in NAMES if name != "mallory"
    ]
    (keys / "trust.yaml").write_text(yaml.safe_dump(trust))
    return keys


def _tokens_file(tmp_path: Path, grants: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({"tokens": {digest(TOKENS[name]): grant for name, grant in grants.items()}}))
    return path


GRANTS: dict[str, dict[str, object]] = {
    "ci": {"identity": "ci", "signing_key": "keys/ci.key"},
    "alice": {"identity": "alice", "signing_key": "keys/alice.key"},
    "viewer": {"identity": "viewer", "read_only": True},
}


@pytest.fixture
async def reactor(tmp_path: Path) -> AsyncIterator[Reactor]:
    keys = _keys(tmp_path)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(FOUR_EYES_POLICY))
    settings = Settings(
        state_dir=tmp_path / "state",
        signing_key=keys / "reactor.key",
        trust_file=keys / "trust.yaml",
        policy_file=tmp_path / "policy.yaml",
        require_signed=True,
    )
    tokens = load_tokens(_tokens_file(tmp_path, GRANTS))
    trust = load_trust_file(keys / "trust.yaml")
    tokens.check_signing(trust, required=True)
    async with embedded(settings) as session:
        feed = Feed("/reactor")
        reading = asyncio.create_task(feed.run(session.bus))
        app = create_app(Api(store=session.backends.store, bus=session.bus, feed=feed, tokens=tokens, trust=trust))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
                yield Reactor(client, session, keys)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading


def _release(release_id: str, *node_keys: str, **strategy: object) -> ReleaseRequested:
    plan = ReleasePlan(
        release_id=release_id,
        service="app",
        version="2.0.0",
        package=Package(url=PACKAGES + "app.tar.gz", sha256="a" * 64),
        nodes=[NodeTarget(node_key=key) for key in node_keys],
        strategy=Strategy.model_validate(strategy),
    )
    return ReleaseRequested(release_id=release_id, plan=plan)


def _structured(event: ReleaseRequested) -> str:
    record = encode(event, "/ci/test")
    document: dict[str, object] = {
        name.removeprefix("ce_"): value.decode() for name, value in record.headers if name.startswith("ce_")
    }
    document["datacontenttype"] = "application/json"
    document["data"] = json.loads(record.value)
    return json.dumps(document)


def _binary(record: Record) -> dict[str, str]:
    """The HTTP headers of a Kafka binary-mode record (ce_x as ce-x), its signature among them."""
    headers = {name.replace("ce_", "ce-", 1): value.decode() for name, value in record.headers}
    headers["content-type"] = "application/json"
    return headers


async def test_commands_are_signed_as_the_tokens_identity_and_four_eyes_holds_over_http(reactor: Reactor) -> None:
    """ci submits over HTTP and its approval is refused by the policy (four-eyes: the pacer sees ci signed both);
    alice's approval over HTTP is accepted and the release completes; every message verifies as its identity's."""
    client = reactor.client
    event = _release("app-2", "noop/web-1/app", "noop/web-2/app", batches=[1], approval_every_batch=True)
    content = {"content-type": "application/cloudevents+json"}
    response = await client.post("/api/v1/releases", headers=reactor.auth("ci", **content), content=_structured(event))
    assert response.status_code == 202, response.text
    await reactor.session.settle_release("app-2", timeout_s=30)
    assert await reactor.session.release_state("app-2") == ReleaseState.AWAITING_APPROVAL

    response = await client.post("/api/v1/releases/app-2/approve", headers=reactor.auth("ci"))
    assert response.status_code == 202, response.text
    await reactor.session.settle_release("app-2", timeout_s=30)
    [(subject, reason)] = reactor.dead_letters()
    assert subject == "app-2"
    assert reason.startswith("policy: services.app.four_eyes: "), reason
    assert await reactor.session.release_state("app-2") == ReleaseState.AWAITING_APPROVAL

    response = await client.post("/api/v1/releases/app-2/approve", headers=reactor.auth("alice"))
    assert response.status_code == 202, response.text
    await reactor.session.settle_release("app-2", timeout_s=30)
    record = await reactor.session.backends.store.get_release("app-2")
    assert record is not None
    assert (record.state, record.submitter) == (ReleaseState.COMPLETED, "ci")

    signed = reactor.signers(Topic.RELEASES)
    commands = [(kind, signer) for kind, signer in signed if kind.endswith((".requested.v1", ".approved.v1"))]
    assert commands == [
        (ReleaseRequested.TYPE, "ci"),
        ("dev.deployreactor.release.approved.v1", "ci"),
        ("dev.deployreactor.release.approved.v1", "alice"),
    ]
    # What the reactor derived is its own.
    assert {signer for kind, signer in signed if (kind, signer) not in commands} == {"reactor"}
    whoami = (await client.get("/api/v1/whoami", headers=reactor.auth("alice"))).json()
    assert whoami == {
        "identity": "alice",
        "read_only": False,
        "key_id": load_signing_key(reactor.keys / "alice.key").key_id,
    }
    assert (await client.get("/api/v1/whoami", headers=reactor.auth("viewer"))).json()["key_id"] is None


async def test_a_release_the_sender_signed_goes_on_with_its_own_signature(reactor: Reactor) -> None:
    """A binary-mode ReleaseRequested signed by ci reaches the topic byte for byte with ci's signature; the same
    signed by ci under alice's token, tampered after signing, or signed by an untrusted key is refused with 403."""
    ci_key = load_signing_key(reactor.keys / "ci.key")
    record = sign_record(encode(_release("app-3", "noop/web-1/app"), "/ci/test"), ci_key)
    headers = _binary(record)

    response = await reactor.client.post(
        "/api/v1/releases", headers=reactor.auth("alice", **headers), content=record.value
    )
    assert (response.status_code, response.json()["field"]) == (403, "ce-dssematerial")
    assert "signed by 'ci', not by the authenticated identity 'alice'" in response.json()["detail"]

    tampered = record.value.replace(b"noop/web-1/app", b"noop/web-9/app")
    response = await reactor.client.post("/api/v1/releases", headers=reactor.auth("ci", **headers), content=tampered)
    assert response.status_code == 403
    assert response.json()["detail"].startswith("signature: tampered"), response.text

    mallory = sign_record(record, load_signing_key(reactor.keys / "mallory.key"))
    response = await reactor.client.post(
        "/api/v1/releases", headers=reactor.auth("ci", **_binary(mallory)), content=mallory.value
    )
    assert response.status_code == 403
    assert response.json()["detail"].startswith("signature: unknown key"), response.text
    assert reactor.session.bus.records(Topic.RELEASES) == []

    response = await reactor.client.post(
        "/api/v1/releases", headers=reactor.auth("ci", **headers), content=record.value
    )
    assert response.status_code == 202, response.text
    await reactor.session.settle_release("app-3", timeout_s=30)
    assert await reactor.session.release_state("app-3") == ReleaseState.COMPLETED
    first = reactor.session.bus.records(Topic.RELEASES)[0]
    assert first.header(MATERIAL_HEADER) == record.header(MATERIAL_HEADER)
    assert first.value == record.value
    assert reactor.dead_letters() == []


def test_tokens_that_could_not_sign_as_their_identity_are_refused_at_start(tmp_path: Path) -> None:
    """With signatures required a writer needs a key; a key must be its identity's own in the trust file, and never a
    reactor identity's; a key file others can read is refused; a read-only token needs no key."""
    keys = _keys(tmp_path)
    trust = load_trust_file(keys / "trust.yaml")
    cases: list[tuple[dict[str, object], str]] = [
        ({"identity": "ci"}, "identity 'ci' may write, and signatures are required: give its token a signing_key"),
        ({"identity": "ci", "signing_key": "keys/alice.key"}, "is identity 'alice''s"),
        ({"identity": "ci", "signing_key": "keys/mallory.key"}, "is not in the trust file"),
        ({"identity": "reactor", "signing_key": "keys/reactor.key"}, "must not be a reactor identity's key"),
    ]
    for grant, message in cases:
        tokens = load_tokens(_tokens_file(tmp_path, {"ci": grant}))
        with pytest.raises(InvalidInput) as raised:
            tokens.check_signing(trust, required=True)
        assert raised.value.field == "api_tokens"
        assert message in raised.value.rule, raised.value.rule
    # Without required signatures, a writer without a key publishes as the server does.
    load_tokens(_tokens_file(tmp_path, {"ci": {"identity": "ci"}})).check_signing(trust, required=False)
    load_tokens(_tokens_file(tmp_path, {"viewer": GRANTS["viewer"]})).check_signing(trust, required=True)

    os.chmod(keys / "ci.key", 0o644)
    with pytest.raises(InvalidInput) as raised:
        load_tokens(_tokens_file(tmp_path, {"ci": GRANTS["ci"]}))
    assert "identity 'ci': signing_key: " in raised.value.rule
    assert "accessible by group or others" in raised.value.rule
    assert TOKENS["ci"] not in str(raised.value)
