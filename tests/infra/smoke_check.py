#!/usr/bin/env python3
"""Smoke check of a running test environment (not a pytest test).

Needs aiokafka and pymongo, and the env vars printed by `scripts/testenv up kafka mongo`:
REACTOR_KAFKA_BOOTSTRAP and/or REACTOR_MONGO_URL (a missing one skips that part;
pass --require to make a missing one an error).

Kafka: create a 4-partition topic (AIOKafkaAdminClient), produce with an idempotent
producer, consume in a consumer group with manual commit, check the committed offsets.
Mongo: unique index, guarded find_one_and_update with upsert, count.
Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

N_MESSAGES = 40
PARTITIONS = 4


def say(msg: str) -> None:
    print(f"[smoke] {msg}", flush=True)


async def check_kafka(bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    group = f"smoke-group-{uuid.uuid4().hex[:8]}"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=PARTITIONS, replication_factor=1)])
        meta = await admin.describe_topics([topic])
        parts = meta[0]["partitions"]
        assert len(parts) == PARTITIONS, f"expected {PARTITIONS} partitions, got {meta}"
        say(f"created topic {topic} with {len(parts)} partitions")
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        sent: dict[int, int] = {}
        for i in range(N_MESSAGES):
            md = await producer.send_and_wait(topic, key=f"key-{i}".encode(), value=f"v{i}".encode())
            sent[md.partition] = sent.get(md.partition, 0) + 1
        txn = getattr(producer, "_txn_manager", None)  # private, best effort: proves InitProducerId worked
        pid = getattr(txn, "producer_id", None)
        assert txn is None or (pid is not None and pid >= 0), f"no producer id: {pid}"
        say(
            f"idempotent producer (producer_id={pid}) sent {N_MESSAGES} messages, "
            f"per partition {dict(sorted(sent.items()))}"
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        got: list[str] = []
        deadline = time.monotonic() + 60
        while len(got) < N_MESSAGES:
            if time.monotonic() > deadline:
                raise AssertionError(f"consumed only {len(got)}/{N_MESSAGES} messages in 60s")
            batch = await consumer.getmany(timeout_ms=1000)
            for _tp, msgs in batch.items():
                got.extend(m.value.decode() for m in msgs)
        assert sorted(got) == sorted(f"v{i}" for i in range(N_MESSAGES)), got
        await consumer.commit()
        say(f"consumer group {group} read {len(got)} messages and committed")
    finally:
        await consumer.stop()

    # Fresh consumer in the same group: committed offsets must equal the per-partition counts.
    check = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await check.start()
    try:
        for p in range(PARTITIONS):
            committed = await check.committed(TopicPartition(topic, p))
            expected = sent.get(p, 0)
            assert (committed or 0) == expected, f"partition {p}: committed {committed}, expected {expected}"
        say(f"committed offsets verified: {dict(sorted(sent.items()))}")
    finally:
        await check.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def check_mongo(url: str) -> None:
    from pymongo import AsyncMongoClient, ReturnDocument
    from pymongo.errors import DuplicateKeyError

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(url, serverSelectionTimeoutMS=10000)
    db = client[f"smoke_{uuid.uuid4().hex[:8]}"]
    try:
        info = await client.server_info()
        say(f"mongo server version {info.get('version')}")
        coll = db["deployments"]
        await coll.create_index([("app", 1), ("env", 1)], unique=True, name="app_env_unique")

        # Upsert creates the document.
        doc = await coll.find_one_and_update(
            {"app": "web", "env": "prod"},
            {"$set": {"state": "pending"}, "$setOnInsert": {"rev": 0}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc and doc["state"] == "pending" and doc["rev"] == 0, doc

        # Guarded transition (compare-and-set on state + rev) succeeds once...
        doc = await coll.find_one_and_update(
            {"app": "web", "env": "prod", "state": "pending", "rev": 0},
            {"$set": {"state": "running"}, "$inc": {"rev": 1}},
            return_document=ReturnDocument.AFTER,
        )
        assert doc and doc["state"] == "running" and doc["rev"] == 1, doc
        # ... and a stale guard matches nothing.
        stale = await coll.find_one_and_update(
            {"app": "web", "env": "prod", "state": "pending", "rev": 0},
            {"$set": {"state": "failed"}},
        )
        assert stale is None, stale

        # Unique index is enforced.
        try:
            await coll.insert_one({"app": "web", "env": "prod", "state": "dup"})
        except DuplicateKeyError:
            pass
        else:
            raise AssertionError("unique index not enforced")

        await coll.insert_one({"app": "web", "env": "staging", "state": "pending", "rev": 0})
        n = await coll.count_documents({"app": "web"})
        assert n == 2, n
        n_running = await coll.count_documents({"state": "running"})
        assert n_running == 1, n_running
        say("mongo: unique index, guarded find_one_and_update with upsert, count OK")
    finally:
        await client.drop_database(db.name)
        await client.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", action="store_true", help="fail if an env var is missing")
    args = ap.parse_args()

    bootstrap = os.environ.get("REACTOR_KAFKA_BOOTSTRAP")
    mongo_url = os.environ.get("REACTOR_MONGO_URL")
    if not bootstrap and not mongo_url:
        say("neither REACTOR_KAFKA_BOOTSTRAP nor REACTOR_MONGO_URL is set")
        return 2
    failed = False
    for name, value, check in (("kafka", bootstrap, check_kafka), ("mongo", mongo_url, check_mongo)):
        if not value:
            say(f"{name}: env var not set, " + ("FAIL" if args.require else "skipped"))
            failed |= args.require
            continue
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(check(value), timeout=120)
            say(f"{name}: OK ({time.monotonic() - t0:.1f}s)")
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            say(f"{name}: FAIL: {type(e).__name__}: {e}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
