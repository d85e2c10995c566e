"""The deploy policy on a real Kafka broker, signatures required: a release outside the policy (its service, its
nodes, its artifact source) is refused at submit with the rule named and nothing planned; under four-eyes the
submitter's approval is refused and a second identity's accepted, and the release completes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml

from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.kafka_bus import KafkaBus
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.events import NodeTarget, Package, ReleaseApproved, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.ports import ReleaseRecord
from reactor.recovery import recover
from reactor.runtime import Role, kafka_bus, load_policy_setting, load_signatures
from reactor.settings import Settings
from reactor.trust import generate_key
from tests.support import FOUR_EYES_POLICY, PACKAGES, running_roles

pytestmark = pytest.mark.kafka

WAIT_S = 90.0
NAMES = ("reactor", "ci", "alice")


@dataclass
class Reactor:
    """Every role on one Kafka bus with the policy; a bus per identity that signs with its key."""

    bus: KafkaBus
    signed_by: dict[str, KafkaBus]
    store: EmbeddedStore
    settings: Settings

    async def dead_letters(self, count: int) -> list[tuple[str, str]]:
        """(release id, reason) of every dead letter, once there are `count`."""
        async with asyncio.timeout(WAIT_S):
            while True:
                records = await self.bus.history(Topic.DLQ)
                if len(records) >= count:
                    return [
                        ((record.header("ce_subject") or b"").decode(), (record.header(DLQ_REASON) or b"").decode())
                        for record in records
                    ]
                await asyncio.sleep(0.2)

    async def release_when(self, release_id: str, done: Callable[[ReleaseRecord], bool]) -> ReleaseRecord:
        async with asyncio.timeout(WAIT_S):
            while True:
                record = await self.store.get_release(release_id)
                if record is not None and done(record):
                    return record
                await asyncio.sleep(0.1)


@pytest.fixture
async def reactor(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Reactor]:
    keys = tmp_path / "keys"
    for name in NAMES:
        generate_key(name, keys)
    trust = [{"name": name, "public_key": f"{name}.pub", "reactor": name == "reactor"} for name in NAMES]
    (keys / "trust.yaml").write_text(yaml.safe_dump(trust))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(FOUR_EYES_POLICY))
    settings = Settings(
        mode="distributed",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"p{uuid4().hex[:10]}.",
        signing_key=keys / "reactor.key",
        trust_file=keys / "trust.yaml",
        policy_file=tmp_path / "policy.yaml",
        state_dir=tmp_path / "state",
    )
    assert settings.signatures_required()
    per_identity = {name: settings.model_copy(update={"signing_key": keys / f"{name}.key"}) for name in NAMES}
    async with (
        kafka_bus(settings, load_signatures(settings)) as bus,
        kafka_bus(per_identity["ci"], load_signatures(per_identity["ci"])) as ci,
        kafka_bus(per_identity["alice"], load_signatures(per_identity["alice"])) as alice,
        EmbeddedStore(tmp_path / "reactor.db") as store,
    ):
        await bus.create_topics(partitions=4)
        async with running_roles(bus, store, settings, {Role.ALL}):
            yield Reactor(bus, {"ci": ci, "alice": alice}, store, settings)


def _release(
    release_id: str, *node_keys: str, service: str = "app", url: str = PACKAGES + "app.tar.gz", **strategy: Any
) -> ReleaseRequested:
    plan = ReleasePlan(
        release_id=release_id,
        service=service,
        version="2.0.0",
        package=Package(url=url, sha256="a" * 64),
        nodes=[NodeTarget(node_key=key) for key in node_keys],
        strategy=Strategy(**strategy),
    )
    return ReleaseRequested(release_id=release_id, plan=plan, actor="ci")


async def test_policy_refuses_at_submit_and_holds_four_eyes_on_kafka(reactor: Reactor) -> None:
    """Three releases outside the policy dead-lettered with their rules, none planned; then a release inside it:
    ci's own approval refused (four-eyes), alice's accepted, and it completes on every node."""
    ci, alice = reactor.signed_by["ci"], reactor.signed_by["alice"]
    refused = [
        (_release("other-2", "noop/web-1/other", service="other"), "policy: services: "),
        (_release("app-db", "noop/web-1/app", "noop/db-1/app"), "policy: services.app.nodes: "),
        (
            _release("app-evil", "noop/web-1/app", url="https://evil.test/app/app.tar.gz"),
            "policy: services.app.artifacts.packages: ",
        ),
    ]
    for request, _ in refused:
        await ci.publish(request)
    reasons = dict(await reactor.dead_letters(len(refused)))
    for request, rule in refused:
        assert reasons[request.release_id].startswith(rule), reasons
        assert await reactor.store.get_release(request.release_id) is None
    assert await reactor.bus.history(Topic.COMMANDS) == []

    await ci.publish(_release("app-2", "noop/web-1/app", "noop/web-2/app", batches=[1], approval_every_batch=True))
    await reactor.release_when("app-2", lambda record: record.state == ReleaseState.AWAITING_APPROVAL)
    await ci.publish(ReleaseApproved(release_id="app-2", actor="ci"))
    [reason] = [why for subject, why in await reactor.dead_letters(len(refused) + 1) if subject == "app-2"]
    assert reason.startswith("policy: services.app.four_eyes: "), reason
    waiting = await reactor.store.get_release("app-2")
    assert waiting is not None
    assert waiting.state == ReleaseState.AWAITING_APPROVAL

    await alice.publish(ReleaseApproved(release_id="app-2", actor="alice"))
    done = await reactor.release_when(
        "app-2", lambda record: record.state in {ReleaseState.COMPLETED, ReleaseState.HALTED}
    )
    assert (done.state, done.submitter) == (ReleaseState.COMPLETED, "ci")
    nodes = await reactor.store.list_nodes(release_id="app-2")
    assert [(node.node_key, node.state) for node in nodes] == [
        ("noop/web-1/app", NodeState.SUCCESS),
        ("noop/web-2/app", NodeState.SUCCESS),
    ]

    # The store lost: recovery from the topics brings back app-2 as the live store has it, submitted by ci, and
    # none of the refused releases; ci's refused approval stays refused, alice's counts.
    async with EmbeddedStore(":memory:") as fresh:
        report = await recover(
            reactor.bus,
            fresh,
            signatures=load_signatures(reactor.settings),
            policy=load_policy_setting(reactor.settings),
        )
        [recovered] = await fresh.list_releases()
        assert (recovered.release_id, recovered.state, recovered.submitter) == ("app-2", ReleaseState.COMPLETED, "ci")
    assert (report.refused, report.policy_refused) == (0, len(refused) + 1)
