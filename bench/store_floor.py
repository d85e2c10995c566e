"""The server's own CPU time per request on FerretDB: what no change to the reactor takes a node below.

    python bench/store_floor.py [--backend postgresql] [--documents 10000] [--requests 2000] [--concurrency 16]

Starts a FerretDB of its own on `--backend` (and its PostgreSQL) with the test harness, so that its processes are
known: their CPU time is read from /proc. On one collection of `--documents` documents shaped like a release's node
rows, each kind of request the loop sends is made `--requests` times, `--concurrency` at once: a read by `_id`, a
conditional update by `_id` (the filter a compare-and-set sends), a single insert; and the same changes in bulk (an
`update_many` by fields the server passes to its storage, an `insert_many` of 1,000), per document. Baseline in the
same run: one document of the bulk insert, the cheapest write the server has.

From these, the ceiling a node's state changes set on this machine's cores with nothing else running: a node changes
state four times (sent, claimed, finished, counted), each a conditional write, whether one `update_one` each or one
document of an `update_many`. A lower bound of the server's work: on FerretDB a compare-and-set also takes and gives
back a lock document, and on SQLite reads the document by `_id` first (MongoStore's lock path).
The last line is one JSON object: {"bench": "store_floor", "backend": b, "server_cpu_ms": {"<request>": x, ...},
"vs_bulk_insert": {"<request>": x, ...}, "ceiling_nodes_per_s": {"update_one": x, "update_many": x}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymongo import AsyncMongoClient

from bench.bus import tree_cpu_s
from reactor.adapters.ferretdb_postgresql import ensure_indexes
from reactor.adapters.ferretdb_sqlite import ensure_id_indexes
from tests.infra import testenv

# The state changes of one node, each a conditional write: sent (pacer), claimed and finished (worker), counted (pacer).
WRITES_PER_NODE = 4
SENT, DONE = {"state": "sent"}, {"state": "done"}
DATABASE = "store_floor"


async def measure(
    pids: list[int], count: int, concurrency: int, request: Callable[[int], Awaitable[object]]
) -> tuple[float, float]:
    """Server CPU milliseconds per call of `request(i)` for i in range(count), `concurrency` at once; calls per s."""
    limit = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with limit:
            await request(index)

    before = sum(map(tree_cpu_s, pids))
    begin = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    elapsed = time.perf_counter() - begin
    return (sum(map(tree_cpu_s, pids)) - before) * 1000 / count, count / elapsed


async def run(service: testenv.Service, documents: int, requests: int, concurrency: int) -> dict[str, float]:
    pids = [service.pid, *(part.pid for part in service.parts)]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        service.env["REACTOR_MONGO_URL"], maxPoolSize=concurrency
    )
    rows = client[DATABASE]["release_nodes"]
    figures: dict[str, float] = {}
    try:
        await rows.drop()
        await client[DATABASE].create_collection("release_nodes")
        # The indexes the store makes in FerretDB's storage (MongoStore at open), so each request is served as the
        # store's own are.
        if postgresql_url := service.env.get("REACTOR_FERRETDB_POSTGRESQL_URL"):
            await ensure_indexes(postgresql_url, DATABASE)
        if sqlite_dir := service.env.get("REACTOR_FERRETDB_SQLITE_DIR"):
            await ensure_id_indexes(Path(sqlite_dir), DATABASE, ["release_nodes"])
        for start in range(0, documents, 1000):
            await rows.insert_many(
                [
                    {"_id": f"r/{i}", "release_id": "r", "batch": i // 100, "position": i, "state": "queued"}
                    for i in range(start, min(start + 1000, documents))
                ]
            )
        # Warm: every connection of the pool open (FerretDB opens its own to PostgreSQL with each), caches filled.
        await measure(pids, 10 * concurrency, concurrency, lambda i: rows.find_one({"_id": f"r/{i % documents}"}))
        # A compare-and-set's filter as the store sends it: FerretDB on SQLite passes only `{_id: value}` to its
        # storage, so there the store checks the condition itself under a lock and updates by `_id` alone.
        condition = {} if service.env.get("REACTOR_FERRETDB_SQLITE_DIR") else {"state": "queued"}
        kinds: list[tuple[str, int, Callable[[int], Awaitable[object]]]] = [
            ("read by _id", 1, lambda i: rows.find_one({"_id": f"r/{i % documents}"})),
            (
                "conditional update by _id",
                1,
                lambda i: rows.update_one({"_id": f"r/{i % documents}", **condition}, {"$set": SENT}),
            ),
            ("insert_one", 1, lambda i: rows.insert_one({"_id": f"one/{i}", "state": "queued"})),
            (
                "update_many by equality, per document",
                100,
                lambda i: rows.update_many({"release_id": "r", "batch": i, "state": "sent"}, {"$set": DONE}),
            ),
            (
                "insert_many, per document",
                1000,
                lambda i: rows.insert_many([{"_id": f"many/{i}/{j}", "state": "queued"} for j in range(1000)]),
            ),
        ]
        for name, per_call, request in kinds:
            calls = max(1, min(requests, documents) // per_call)
            cpu_ms, rate = await measure(pids, calls, 1 if per_call > 1 else concurrency, request)
            figures[name] = cpu_ms / per_call
            print(f"  {name:40s} {cpu_ms / per_call:8.3f} ms of server CPU  ({rate * per_call:8.0f} a second)")
    finally:
        await client.drop_database(DATABASE)
        await client.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", default="postgresql", choices=testenv.FERRETDB_BACKENDS)
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    testenv.install_ferretdb(args.backend)
    with (
        tempfile.TemporaryDirectory(prefix="reactor-bench-") as work,
        testenv.start_ferretdb(Path(work) / "mongo", backend=args.backend) as service,
    ):
        print(f"FerretDB on {args.backend}, {args.documents} documents, machine: {cores} cores")
        figures = asyncio.run(run(service, args.documents, args.requests, args.concurrency))
    baseline = figures["insert_many, per document"]
    print(f"  baseline: one document of insert_many, {baseline:.3f} ms")
    ceiling = {
        "update_one": cores * 1000 / (WRITES_PER_NODE * figures["conditional update by _id"]),
        "update_many": cores * 1000 / (WRITES_PER_NODE * figures["update_many by equality, per document"]),
    }
    print(
        f"a node's {WRITES_PER_NODE} conditional writes alone (on FerretDB the store's lock documents, and on SQLite"
        f" its read by _id, come on top), with nothing else on the machine, allow at most {ceiling['update_one']:.0f}"
        f" nodes/s as update_one each, {ceiling['update_many']:.0f} nodes/s as documents of update_many"
        f" (on {cores} cores)"
    )
    print(
        json.dumps(
            {
                "bench": "store_floor",
                "backend": args.backend,
                "server_cpu_ms": {name: round(value, 4) for name, value in figures.items()},
                "vs_bulk_insert": {name: round(value / baseline, 1) for name, value in figures.items()},
                "ceiling_nodes_per_s": {name: round(value) for name, value in ceiling.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
