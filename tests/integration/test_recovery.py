"""Losing the database mid-release on Kafka and FerretDB: `reactor recover` rebuilds it from the topics and the
workers carry on, deploying every node once."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from reactor.adapters.mongo_store import MongoStore
from reactor.codec import decode
from reactor.domain.pacer import ItemState, ReleaseState
from reactor.domain.status import NodeState
from reactor.events import (
    DeployRequested,
    NodeDeployed,
    NodeTarget,
    Package,
    ReleasePlan,
    ReleaseRequested,
    Strategy,
    Topic,
)
from reactor.ports import Store
from reactor.runtime import Role
from reactor.settings import Settings
from tests.conftest import fresh_kafka_bus
from tests.fakes import Script, scripted
from tests.support import equals, running_roles, until

pytestmark = [pytest.mark.kafka, pytest.mark.mongo, pytest.mark.timeout(300)]

PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="d" * 64)
NODES = [f"fake/host-{index:02d}/app" for index in range(6)]
WAIT_S = 90.0


async def snapshot(store: Store) -> tuple[object, dict[str, ItemState]]:
    record = await store.get_release("app-2")
    assert record is not None
    rows = {row.node_key: row.state for row in await store.list_release_nodes("app-2")}
    return (record.state, record.batch, record.approved_batch, record.budget, record.batch_sizes), rows


async def test_a_store_lost_mid_release_is_rebuilt_from_the_topics_and_the_release_carries_on(
    kafka_bootstrap: str, mongo_url: str, mongo_database: str, tmp_path: Path
) -> None:
    """Batch 1 deployed, batch 2 in flight, then the database is dropped: recovery puts back node status, the
    processed requests and the release (batch, node progress); the restarted workers finish batches 2 and 3 and
    deploy no node of batch 1 again."""
    plan = ReleasePlan(
        release_id="app-2",
        service="app",
        version="2.0.0",
        package=PACKAGE,
        nodes=[NodeTarget(node_key=key) for key in NODES],
        strategy=Strategy(batches=[2, 2, 2], max_parallel=2, failure_budget=0),
    )
    before = Script(latched=True)
    settings = Settings(state_dir=tmp_path / "state", local_root=tmp_path / "nodes")
    async with fresh_kafka_bus(kafka_bootstrap, retry_delay_s=0.05, grace_s=2.0) as bus:
        async with MongoStore(mongo_url, database=mongo_database) as live:
            async with running_roles(bus, live, settings, {Role.ALL}, {"fake": scripted(before)}):
                await bus.publish(ReleaseRequested(release_id="app-2", plan=plan))
                await until(lambda: len(before.held) == 2, "batch 1 in flight", WAIT_S)
                first_batch = before.let_go()
                await until(lambda: len(before.held) == 2, "batch 2 in flight", WAIT_S)
                second_batch = before.held
            lost = await snapshot(live)
            expected = dict.fromkeys(NODES, ItemState.QUEUED)
            expected |= dict.fromkeys(first_batch, ItemState.SUCCEEDED) | dict.fromkeys(
                second_batch, ItemState.DISPATCHED
            )
            assert lost[1] == expected
            await live.db.client.drop_database(mongo_database)

        async with MongoStore(mongo_url, database=mongo_database) as rebuilt:
            assert await rebuilt.get_release("app-2") is None
            env = {
                **os.environ,
                "REACTOR_MODE": "distributed",
                # Tests publish through fixture buses that sign nothing (signed commands: test_signed_commands.py).
                "REACTOR_REQUIRE_SIGNED": "false",
                "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
                "REACTOR_TOPIC_PREFIX": bus.prefix,
                "REACTOR_MONGO_URL": mongo_url,
                "REACTOR_MONGO_DATABASE": mongo_database,
            }
            code, output = await reactor(env, "recover")
            assert code == 0, output
            assert "recovered 2 node statuses, 2 finished requests and 1 release records" in output
            code, output = await reactor(env, "recover")
            assert code == 2
            assert "invalid store: is not empty" in output
            assert await snapshot(rebuilt) == lost
            for key in first_batch:
                status = await rebuilt.get_node(key)
                assert status is not None
                assert (status.state, status.current_version) == (NodeState.SUCCESS, "2.0.0")
            commands = [decode(record)[0] for record in await bus.history(Topic.COMMANDS)]
            deploys = {event.node_key: event for event in commands if isinstance(event, DeployRequested)}
            for key in first_batch:
                assert await rebuilt.get_processed(deploys[key].event_id) is not None

            after = Script()
            async with running_roles(bus, rebuilt, settings, {Role.ALL}, {"fake": scripted(after)}):
                await until(
                    lambda: equals(_state(rebuilt), ReleaseState.COMPLETED),
                    "the release completes after recovery",
                    WAIT_S,
                )
            assert not any(after.calls[f"deploy:{key}"] for key in first_batch)
            assert all(after.calls[f"deploy:{key}"] == 1 for key in NODES if key not in first_batch)
            outcomes = [decode(record)[0] for record in await bus.history(Topic.OUTCOMES)]
            deployed = {event.event_id: event.node_key for event in outcomes if isinstance(event, NodeDeployed)}
            assert sorted(deployed.values()) == sorted(NODES)


async def reactor(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run the `reactor` CLI; its exit code and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reactor.cli.main",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return await process.wait(), output.decode(errors="replace")


async def _state(store: Store) -> ReleaseState | None:
    record = await store.get_release("app-2")
    return None if record is None else record.state
