"""The deploy policy enforced by a running reactor on the in-memory bus, signatures required (embedded mode
switched on): the pacer refuses releases and release commands outside it, the executor worker refuses node
commands outside it, each to `dlq` with a reason starting `policy:` that names the rule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reactor.adapters.dispatch import DLQ_REASON
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import encode
from reactor.domain.pacer import ReleaseState
from reactor.domain.status import NodeState
from reactor.errors import InvalidInput
from reactor.events import (
    DeployRequested,
    Event,
    NodeTarget,
    Package,
    ReleaseApproved,
    ReleasePaused,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from reactor.runtime import Role, load_signatures
from reactor.settings import Settings
from reactor.trust import SigningKey, generate_key, load_signing_key, sign_record
from tests.support import running_roles

pytestmark = pytest.mark.unit

PACKAGES = "https://packages.example.com/app/"
POLICY: dict[str, Any] = {
    "services": {
        "app": {
            "submit": ["ci"],
            "deploy": ["ops"],
            "approve": ["ci", "alice"],
            "pause": ["alice"],
            "nodes": [{"key": "noop/web-*/app"}, {"labels": {"env": "prod"}}],
            "artifacts": {"packages": [PACKAGES]},
        }
    }
}
NAMES = ("reactor", "ci", "alice", "ops")


@dataclass
class Reactor:
    """Every role running on one signed in-memory bus, with the policy above; keys of each identity."""

    bus: MemoryBus
    store: EmbeddedStore
    keys: dict[str, SigningKey]

    async def send(self, signer: str, event: Event) -> None:
        """Publish `event` signed by `signer`, and wait until the reactor has done everything it causes."""
        await self.bus.publish_raw(event.TOPIC, sign_record(encode(event, f"/{signer}"), self.keys[signer]))
        await self.bus.idle()

    def dead_letters(self) -> list[str]:
        return [(record.header(DLQ_REASON) or b"").decode() for record in self.bus.records(Topic.DLQ)]


@pytest.fixture
async def reactor(tmp_path: Path) -> AsyncIterator[Reactor]:
    keys_dir = tmp_path / "keys"
    for name in NAMES:
        generate_key(name, keys_dir)
    trust = [{"name": name, "public_key": f"{name}.pub", "reactor": name == "reactor"} for name in NAMES]
    (keys_dir / "trust.yaml").write_text(yaml.safe_dump(trust))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    settings = Settings(
        mode="embedded",
        require_signed=True,
        signing_key=keys_dir / "reactor.key",
        trust_file=keys_dir / "trust.yaml",
        policy_file=tmp_path / "policy.yaml",
        state_dir=tmp_path / "state",
    )
    keys = {name: load_signing_key(keys_dir / f"{name}.key") for name in NAMES}
    async with (
        MemoryBus(signatures=load_signatures(settings)) as bus,
        EmbeddedStore(tmp_path / "reactor.db") as store,
        running_roles(bus, store, settings, {Role.ALL}),
    ):
        yield Reactor(bus, store, keys)


def _package(url: str = PACKAGES + "app-2.0.0.tar.gz") -> Package:
    return Package(url=url, sha256="a" * 64)


def _release(
    *nodes: NodeTarget, service: str = "app", package: Package | None = None, **strategy: Any
) -> ReleaseRequested:
    plan = ReleasePlan(
        release_id="app-2",
        service=service,
        version="2.0.0",
        package=package or _package(),
        nodes=list(nodes) or [NodeTarget(node_key=f"noop/web-1/{service}")],
        strategy=Strategy(**strategy),
    )
    return ReleaseRequested(release_id=plan.release_id, plan=plan, actor="ci")


@pytest.mark.parametrize(
    ("submitter", "request_", "rule"),
    [
        ("alice", _release(), "services.app.submit"),
        ("ci", _release(service="other"), "services"),
        (
            "ci",
            _release(NodeTarget(node_key="noop/web-1/app"), NodeTarget(node_key="noop/db-1/app")),
            "services.app.nodes",
        ),
        ("ci", _release(NodeTarget(node_key="k8s/db", labels={"env": "test"})), "services.app.nodes"),
        ("ci", _release(package=_package("https://evil.test/app/app.tar.gz")), "services.app.artifacts.packages"),
    ],
    ids=["submitter", "service", "node-key", "node-label", "artifact"],
)
async def test_a_release_outside_the_policy_is_refused_at_submit_and_nothing_is_planned(
    reactor: Reactor, submitter: str, request_: ReleaseRequested, rule: str
) -> None:
    """Dead-lettered with the rule named; no release record, no node row, no command, no node touched."""
    await reactor.send(submitter, request_)
    [reason] = reactor.dead_letters()
    assert reason.startswith(f"policy: {rule}: ")
    assert await reactor.store.get_release("app-2") is None
    assert await reactor.store.list_release_nodes("app-2") == []
    assert reactor.bus.records(Topic.COMMANDS) == []
    assert await reactor.store.list_nodes() == []


async def test_a_release_inside_the_policy_runs_by_key_and_by_label(reactor: Reactor) -> None:
    """ci submits app to a node its key allows and one its label allows: both deployed, the submitter recorded."""
    nodes = (NodeTarget(node_key="noop/web-1/app"), NodeTarget(node_key="noop/db-1/app", labels={"env": "prod"}))
    await reactor.send("ci", _release(*nodes))
    assert reactor.dead_letters() == []
    record = await reactor.store.get_release("app-2")
    assert record is not None
    assert (record.state, record.submitter) == (ReleaseState.COMPLETED, "ci")
    assert {node.state for node in await reactor.store.list_nodes()} == {NodeState.SUCCESS}


async def test_four_eyes_the_submitters_approval_is_refused_a_second_identitys_accepted(reactor: Reactor) -> None:
    """ci may approve app releases, but not its own: refused, the release waits; alice's approval lets it finish."""
    nodes = (NodeTarget(node_key="noop/web-1/app"), NodeTarget(node_key="noop/web-2/app"))
    await reactor.send("ci", _release(*nodes, batches=[1], approval_every_batch=True))
    record = await reactor.store.get_release("app-2")
    assert record is not None
    assert record.state == ReleaseState.AWAITING_APPROVAL

    await reactor.send("ci", ReleaseApproved(release_id="app-2", actor="ci"))
    [reason] = reactor.dead_letters()
    assert reason.startswith("policy: services.app.four_eyes: ")
    record = await reactor.store.get_release("app-2")
    assert record is not None
    assert record.state == ReleaseState.AWAITING_APPROVAL

    await reactor.send("alice", ReleaseApproved(release_id="app-2", actor="alice"))
    record = await reactor.store.get_release("app-2")
    assert record is not None
    assert record.state == ReleaseState.COMPLETED
    assert len(reactor.dead_letters()) == 1


async def test_a_release_command_by_an_identity_not_listed_is_refused(reactor: Reactor) -> None:
    """ops may not pause app releases (alice may): refused with the rule, the release carries on waiting."""
    nodes = (NodeTarget(node_key="noop/web-1/app"), NodeTarget(node_key="noop/web-2/app"))
    await reactor.send("ci", _release(*nodes, batches=[1], approval_every_batch=True))
    await reactor.send("ops", ReleasePaused(release_id="app-2", actor="ops"))
    [reason] = reactor.dead_letters()
    assert reason.startswith("policy: services.app.pause: ")
    await reactor.send("alice", ReleasePaused(release_id="app-2", actor="alice"))
    record = await reactor.store.get_release("app-2")
    assert record is not None
    assert record.state == ReleaseState.PAUSED


def _deploy(node_key: str = "noop/web-1/app", **fields: Any) -> DeployRequested:
    values: dict[str, Any] = {"package": _package(), **fields}
    return DeployRequested(node_key=node_key, service="app", version="3.0.0", **values)


async def test_a_direct_deploy_by_an_identity_the_policy_allows_runs(reactor: Reactor) -> None:
    """ops is no reactor identity, but `deploy: [ops]` lets its signed DeployRequested through to the executor."""
    await reactor.send("ops", _deploy())
    assert reactor.dead_letters() == []
    node = await reactor.store.get_node("noop/web-1/app")
    assert node is not None
    assert (node.state, node.current_version) == (NodeState.SUCCESS, "3.0.0")


@pytest.mark.parametrize(
    ("signer", "command", "reason"),
    [
        ("ops", _deploy("noop/db-1/app"), "policy: services.app.nodes: "),
        (
            "ops",
            _deploy(package=_package("https://evil.test/app/app.tar.gz")),
            "policy: services.app.artifacts.packages",
        ),
        ("reactor", _deploy(), "policy: services.app.deploy: "),
        ("reactor", _deploy(release_id="forged"), "policy: services.app.deploy: "),
        ("ci", _deploy(), "signature: not a reactor identity: 'ci'"),
    ],
    ids=["node", "artifact", "reactor-direct", "reactor-unknown-release", "not-a-deploy-identity"],
)
async def test_a_node_command_outside_the_policy_is_refused_by_the_worker(
    reactor: Reactor, signer: str, command: DeployRequested, reason: str
) -> None:
    """Nothing runs: no node record, no outcome."""
    await reactor.send(signer, command)
    [refused] = reactor.dead_letters()
    assert refused.startswith(reason)
    assert await reactor.store.list_nodes() == []
    assert reactor.bus.records(Topic.OUTCOMES) == []


async def test_a_reactor_signed_command_for_a_node_outside_its_release_is_refused(reactor: Reactor) -> None:
    """A command naming a real release, for a node the release does not have: the worker refuses it."""
    await reactor.send("ci", _release())
    assert reactor.dead_letters() == []
    await reactor.send("reactor", _deploy("noop/web-9/app", release_id="app-2"))
    [refused] = reactor.dead_letters()
    assert refused.startswith("policy: services.app: noop/web-9/app is not a node of release app-2")
    assert await reactor.store.get_node("noop/web-9/app") is None


def test_a_policy_without_required_signatures_is_refused_at_start(tmp_path: Path) -> None:
    """The policy decides by verified signer: with signatures off there is none, so the process does not start."""
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    settings = Settings(mode="embedded", policy_file=tmp_path / "policy.yaml", state_dir=tmp_path / "state")
    with pytest.raises(InvalidInput, match=r"^policy_file: .*REACTOR_REQUIRE_SIGNED"):
        load_signatures(settings)
