"""`reactor replay --output json` on a real Kafka broker and FerretDB: the timeline, unreadable records and the
rebuild's differences as one JSON document, and the exit code scripts branch on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.codec import Record, encode
from reactor.events import DeployRequested, NodeDeployed, Package, ReleaseApproved, ReleasePaused, Topic
from reactor.trust import generate_key, load_signing_key, sign_record
from tests.conftest import fresh_kafka_bus

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]

NODE = "fake/host-01/app"
PACKAGE = Package(url="https://packages.example.test/app-2.0.0.tar.gz", sha256="d" * 64)


@pytest.fixture
async def mongo(mongo_url: str, mongo_database: str) -> AsyncIterator[MongoStore]:
    async with MongoStore(mongo_url, database=mongo_database) as store:
        yield store


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    async with fresh_kafka_bus(kafka_bootstrap) as bus:
        yield bus


async def test_replay_json_is_one_document_and_exits_1_only_on_differences(
    kafka: KafkaBus, mongo: MongoStore, mongo_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Without --rebuild: the timeline (ISO times, topic names), undecodable records, `rebuild` null, exit 0.
    With it: the rebuild database and each difference, exit 1 while live status differs from the log, 0 after."""
    deploy = DeployRequested(node_key=NODE, service="app", version="2.0.0", package=PACKAGE, actor="ci-pipeline")
    deployed = NodeDeployed(node_key=NODE, service="app", version="2.0.0", causation_id=deploy.event_id)
    await kafka.publish(deploy)
    await kafka.publish(deployed)
    await kafka.publish_raw(Topic.COMMANDS, Record(key=NODE.encode(), value=b"{not json", headers=()))
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        # Tests publish through fixture buses that sign nothing (signed commands: test_signed_commands.py).
        "REACTOR_REQUIRE_SIGNED": "false",
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": kafka.prefix,
        "REACTOR_MONGO_URL": mongo_url,
        "REACTOR_MONGO_DATABASE": mongo.database,
        "REACTOR_STATE_DIR": str(tmp_path / "cli"),
        "REACTOR_LOG_LEVEL": "debug",
    }

    def replay(*args: str) -> tuple[int, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "reactor.cli.main", "replay", "--output", "json", *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        return result.returncode, json.loads(result.stdout)  # the whole of stdout is the document

    code, shown = replay("--node", NODE)
    assert code == 0
    assert set(shown) == {"timeline", "undecodable", "rebuild"}
    assert shown["rebuild"] is None
    assert [(entry["topic"], entry["event_type"], entry["event_id"]) for entry in shown["timeline"]] == [
        ("commands", "DeployRequested", deploy.event_id),
        ("outcomes", "NodeDeployed", deployed.event_id),
    ]
    first = shown["timeline"][0]
    assert set(first) == {
        *("time", "topic", "event_type", "subject", "release_id", "actor", "summary", "event_id"),
        *("signer", "unverified"),
    }
    assert (first["subject"], first["actor"], first["release_id"]) == (NODE, "ci-pipeline", None)
    assert (first["signer"], first["unverified"]) == (None, None)  # no trust file: nothing is claimed
    assert first["time"] == deploy.occurred_at.isoformat().replace("+00:00", "Z")
    [unreadable] = shown["undecodable"]
    assert unreadable["topic"] == "commands"
    assert unreadable["problem"].startswith("not a CloudEvent")

    rebuilt: list[str] = []
    try:
        code, shown = replay("--rebuild")
        rebuilt.append(shown["rebuild"]["database"])
        assert code == 1
        assert rebuilt[0].startswith(f"{mongo.database}-rebuild-")
        assert shown["rebuild"]["differences"] == [
            {"node_key": NODE, "field": "presence", "live": None, "rebuilt": "present"}
        ]

        async with MongoStore(mongo_url, database=rebuilt[0]) as fresh:
            node = await fresh.get_node(NODE)
        assert node is not None
        await drop(mongo_url, rebuilt.pop())  # the next rebuild may get the same name within the same second
        assert await mongo.put_node(node.model_copy(update={"revision": 0}), expected_revision=0) is not None
        code, shown = replay("--rebuild")
        rebuilt.append(shown["rebuild"]["database"])
        assert (code, shown["rebuild"]["differences"]) == (0, [])
    finally:
        for database in rebuilt:
            await drop(mongo_url, database)


async def drop(mongo_url: str, database: str) -> None:
    async with AsyncMongoClient[dict[str, object]](mongo_url, serverSelectionTimeoutMS=5000) as client:
        await client.drop_database(database)


async def test_replay_with_a_trust_file_shows_the_verified_signer_not_the_stated_actor(
    kafka: KafkaBus, mongo: MongoStore, mongo_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The audit trail names who verifiably signed each command: alice, although the approval says bob; the reactor
    for its deploy; an unsigned command is marked UNVERIFIED with the reason, in text and in JSON."""
    keys = tmp_path / "keys"
    for name in ("reactor", "alice"):
        generate_key(name, keys)
    (keys / "trust.yaml").write_text(
        "- {name: reactor, public_key: reactor.pub, reactor: true}\n- {name: alice, public_key: alice.pub}\n"
    )
    release = f"r-{kafka.prefix.strip('.')}"
    approved = ReleaseApproved(release_id=release, actor="bob")
    paused = ReleasePaused(release_id=release, actor="alice")
    deploy = DeployRequested(node_key=NODE, service="app", version="2.0.0", package=PACKAGE, release_id=release)
    await kafka.publish_raw(Topic.RELEASES, sign_record(encode(approved, "/cli"), load_signing_key(keys / "alice.key")))
    await kafka.publish_raw(Topic.RELEASES, encode(paused, "/cli"))
    await kafka.publish_raw(
        Topic.COMMANDS, sign_record(encode(deploy, "/reactor"), load_signing_key(keys / "reactor.key"))
    )
    env = {
        **os.environ,
        "REACTOR_MODE": "distributed",
        "REACTOR_TRUST_FILE": str(keys / "trust.yaml"),
        "REACTOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "REACTOR_TOPIC_PREFIX": kafka.prefix,
        "REACTOR_MONGO_URL": mongo_url,
        "REACTOR_MONGO_DATABASE": mongo.database,
        "REACTOR_STATE_DIR": str(tmp_path / "cli"),
    }

    def replay(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "reactor.cli.main", "replay", "--release", release, *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    shown = {entry["event_id"]: entry for entry in json.loads(replay("--output", "json"))["timeline"]}
    assert (shown[approved.event_id]["signer"], shown[approved.event_id]["actor"]) == ("alice", "bob")
    assert shown[deploy.event_id]["signer"] == "reactor"
    assert shown[paused.event_id]["signer"] is None
    assert shown[paused.event_id]["unverified"].startswith("signature: unsigned")
    lines = replay().splitlines()
    [approval] = [line for line in lines if "ReleaseApproved" in line]
    assert "[signed by alice; says bob]" in approval
    [pause] = [line for line in lines if "ReleasePaused" in line]
    assert "[UNVERIFIED signature: unsigned" in pause
    [command] = [line for line in lines if "DeployRequested" in line]
    assert "[signed by reactor]" in command
