"""The harness kills Kafka and FerretDB as a crash would and starts them again on their port and their data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from reactor.adapters.kafka_bus import KafkaBus
from reactor.adapters.mongo_store import MongoStore
from reactor.domain.status import pending
from reactor.events import ReleasePaused, Topic
from tests.infra import testenv

pytestmark = [pytest.mark.kafka, pytest.mark.mongo]


@pytest.mark.timeout(600)  # two broker starts on a loaded machine, 120 s each at most
async def test_killed_kafka_and_ferretdb_start_again_on_their_port_with_what_they_held(tmp_path: Path) -> None:
    """After `kill` nothing of the service runs and its port refuses; `relaunch` serves the same address again
    with the topic's message and the stored node written before the kill."""
    kafka = testenv.start_kafka(tmp_path / "kafka")
    ferretdb = testenv.start_ferretdb(tmp_path / "ferretdb")
    try:
        bootstrap, url = kafka.env["REACTOR_KAFKA_BOOTSTRAP"], ferretdb.env["REACTOR_MONGO_URL"]
        exported = dict(ferretdb.env)
        event = ReleasePaused(release_id="hello-1")
        async with KafkaBus(bootstrap, prefix="relaunch.") as bus:
            await bus.create_topics(partitions=1)
            await bus.publish(event)
        async with MongoStore(url, database="relaunch") as store:
            await store.put_node(pending("local/host-1/hello", "hello"), expected_revision=0)

        for service in (kafka, ferretdb):
            service.kill()
            assert not service.alive()
        assert not testenv._tcp_accepts(int(bootstrap.rsplit(":", 1)[1]))
        kafka, ferretdb = testenv.relaunch(kafka), testenv.relaunch(ferretdb)
        await asyncio.to_thread(kafka.wait_ready, testenv.KAFKA_START_TIMEOUT)
        await asyncio.to_thread(ferretdb.wait_ready, testenv.FERRETDB_START_TIMEOUT)

        assert (kafka.env, ferretdb.env) == ({"REACTOR_KAFKA_BOOTSTRAP": bootstrap}, exported)
        data = str(tmp_path / "ferretdb" / "data")
        assert exported == {"REACTOR_MONGO_URL": url, "REACTOR_FERRETDB_SQLITE_DIR": data}
        async with KafkaBus(bootstrap, prefix="relaunch.") as bus:
            assert [record.key for record in await bus.history(Topic.RELEASES)] == [b"hello-1"]
        async with MongoStore(url, database="relaunch") as store:
            stored = await store.get_node("local/host-1/hello")
            assert stored is not None
    finally:
        kafka.stop()
        ferretdb.stop()
