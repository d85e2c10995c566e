"""`reactor recover` rebuilds only what the workers accepted: forged records and what the policy refused stay out,
and each release comes back with its verified submitter.

A live reactor (every role, signatures required, a four-eyes policy) runs on the in-memory bus, which checks every
message as a Kafka consumer does; then its log is recovered into an empty store and compared with the live one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.codec import encode
from reactor.domain.pacer import ReleaseState
from reactor.events import Event, NodeTarget, Package, ReleaseApproved, ReleasePlan, ReleaseRequested, Strategy, Topic
from reactor.ports import Store
from reactor.recovery import recover
from reactor.runtime import load_policy_setting, load_signatures
from reactor.session import Session, embedded
from reactor.settings import Settings
from reactor.trust import generate_key, load_signing_key, sign_record
from tests.support import FOUR_EYES_POLICY, PACKAGES

pytestmark = pytest.mark.unit


def _release(release_id: str, service: str = "app") -> ReleaseRequested:
    plan = ReleasePlan(
        release_id=release_id,
        service=service,
        version="2.0.0",
        package=Package(url=PACKAGES + "app.tar.gz", sha256="a" * 64),
        nodes=[NodeTarget(node_key=f"noop/web-{index}/{service}") for index in (1, 2)],
        strategy=Strategy(batches=[1], approval_every_batch=True),
    )
    return ReleaseRequested(release_id=release_id, plan=plan)


async def _releases(store: Store) -> dict[str, tuple[ReleaseState, str | None, int]]:
    return {record.release_id: (record.state, record.submitter, record.batch) for record in await store.list_releases()}


async def test_recovery_leaves_out_forged_and_refused_records_and_keeps_the_verified_submitter(
    tmp_path: Path,
) -> None:
    """Live: ci's release app-1 passes its gate on alice's approval (ci's own is refused: four-eyes) and completes;
    ci's app-2 waits at its gate after ci approves it; an unsigned release and ci's release of a service outside the
    policy are dead-lettered. Recovered with the workers' signatures and policy: the same releases in the same
    states, each submitted by ci, the same node statuses. Without them, the forged and the refused releases come
    back as if accepted."""
    keys = tmp_path / "keys"
    for name in ("reactor", "ci", "alice"):
        generate_key(name, keys)
    trust = [
        {"name": name, "public_key": f"{name}.pub", "reactor": name == "reactor"} for name in ("reactor", "ci", "alice")
    ]
    (keys / "trust.yaml").write_text(yaml.safe_dump(trust))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(FOUR_EYES_POLICY))
    settings = Settings(
        state_dir=tmp_path / "state",
        signing_key=keys / "reactor.key",
        trust_file=keys / "trust.yaml",
        policy_file=tmp_path / "policy.yaml",
        require_signed=True,
    )
    ci, alice = load_signing_key(keys / "ci.key"), load_signing_key(keys / "alice.key")

    async with embedded(settings) as session:

        async def send(event: Event, key: object | None) -> None:
            record = encode(event, "/ci")
            signed = record if key is None else sign_record(record, ci if key == "ci" else alice)
            await session.bus.publish_raw(event.TOPIC, signed)
            await session.settle(30)

        await send(_release("app-1"), "ci")
        await send(ReleaseApproved(release_id="app-1"), "ci")  # refused: four-eyes
        await send(_release("forged"), None)  # refused: unsigned
        await send(_release("other-1", service="other"), "ci")  # refused: service not in the policy
        await send(ReleaseApproved(release_id="app-1"), "alice")
        await Session.settle_release(session, "app-1", timeout_s=30)
        await send(_release("app-2"), "ci")
        await send(ReleaseApproved(release_id="app-2"), "ci")  # refused: four-eyes
        live_store = session.backends.store
        live = await _releases(live_store)
        assert live == {
            "app-1": (ReleaseState.COMPLETED, "ci", 1),
            "app-2": (ReleaseState.AWAITING_APPROVAL, "ci", 0),
        }
        live_nodes = {status.node_key: status.current_version for status in await live_store.list_nodes()}
        dead_letters = len(session.bus.records(Topic.DLQ))
        assert dead_letters == 4

        async with EmbeddedStore(":memory:") as fresh:
            report = await recover(
                session.bus, fresh, signatures=load_signatures(settings), policy=load_policy_setting(settings)
            )
            assert await _releases(fresh) == live
            assert {status.node_key: status.current_version for status in await fresh.list_nodes()} == live_nodes
        assert (report.refused, report.policy_refused, report.unplaced) == (1, 3, [])

        async with EmbeddedStore(":memory:") as unchecked:
            await recover(session.bus, unchecked)
            careless = await _releases(unchecked)
        # The forged and the refused releases come back (the forged one even holds app-2 up behind it in the queue),
        # and no release has a submitter.
        assert {"forged", "other-1"} <= set(careless)
        assert {submitter for _, submitter, _ in careless.values()} == {None}
