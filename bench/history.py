"""What the history a store keeps costs each hot-path request on FerretDB/PostgreSQL, without and with the store's
indexes in FerretDB's PostgreSQL (reactor/adapters/ferretdb_postgresql.py).

    python bench/history.py [--history 40000] [--requests 100]

Two stores on one FerretDB 1.x on PostgreSQL: one opened without `postgresql_url` (FerretDB's own indexes only), one
with it. Each gets one release of `--small` nodes and is measured (the baseline: tables of a release's size), then
`--history` more node rows, node statuses and finished-request records of releases gone by (what a deployment keeps)
and measured again. A measure is the median milliseconds of one request, over `--requests` of each one after another:
`move_release_node` (two per node: sent, then its outcome), `get_node` and `get_processed` (one each per command).
Figures are ratios to the store's own baseline, measured in the same run.

Starts FerretDB on PostgreSQL with the test harness unless $REACTOR_MONGO_URL and $REACTOR_FERRETDB_POSTGRESQL_URL
name one. The last line is one JSON object: {"bench": "history", "history": n, "without_indexes": {"baseline_ms": {...},
"history_ms": {...}, "history_vs_baseline": {...}}, "with_indexes": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import mongo
from reactor import logs
from reactor.adapters.mongo_store import MongoStore, _node_fields
from reactor.domain.pacer import ItemState
from reactor.domain.status import pending
from reactor.ports import ReleaseNode

_CHUNK = 1000
NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def fill(store: MongoStore, release_id: str, count: int) -> None:
    """A release of `count` nodes: its node rows, each node's status and a finished request per node."""
    for start in range(0, count, _CHUNK):
        keys = [f"local/{release_id}-h{index}/app" for index in range(start, min(count, start + _CHUNK))]
        await store.add_release_nodes(
            [
                ReleaseNode(release_id=release_id, node_key=key, batch=0, position=start + i)
                for i, key in enumerate(keys)
            ]
        )
        statuses = [pending(key, "app").model_copy(update={"release_id": release_id}) for key in keys]
        await store.db["nodes"].insert_many([{"_id": status.node_key, **_node_fields(status)} for status in statuses])
        await store.db["processed"].insert_many([{"_id": f"{key}#1", "outcome": "{}", "at": NOW} for key in keys])


async def median_ms(count: int, request: Callable[[int], Awaitable[object]]) -> float:
    times = []
    for index in range(count):
        begin = time.perf_counter()
        await request(index)
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


async def measure(store: MongoStore, release_id: str, nodes: range) -> dict[str, float]:
    """Median milliseconds of each request on `nodes` of release `release_id` (each moved once, queued to sent)."""

    def key(index: int) -> str:
        return f"local/{release_id}-h{nodes[index]}/app"

    async def move(index: int) -> None:
        moved = await store.move_release_node(
            release_id, key(index), from_states=[ItemState.QUEUED], to_state=ItemState.DISPATCHED
        )
        assert moved

    async def get_node(index: int) -> None:
        assert await store.get_node(key(index)) is not None

    async def get_processed(index: int) -> None:
        assert await store.get_processed(f"{key(index)}#1") is not None

    return {
        "move_release_node": await median_ms(len(nodes), move),
        "get_node": await median_ms(len(nodes), get_node),
        "get_processed": await median_ms(len(nodes), get_processed),
    }


async def run(url: str, postgresql_url: str | None, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    async with MongoStore(url, database=f"bench_{uuid.uuid4().hex[:8]}", postgresql_url=postgresql_url) as store:
        try:
            await fill(store, "current", args.small)
            baseline = await measure(store, "current", range(args.requests))
            for start in range(0, args.history, 10_000):
                await fill(store, f"past-{start}", min(10_000, args.history - start))
            with_history = await measure(store, "current", range(args.requests, 2 * args.requests))
        finally:
            await store.db.client.drop_database(store.database)
    return {
        "baseline_ms": {name: round(value, 3) for name, value in baseline.items()},
        "history_ms": {name: round(value, 3) for name, value in with_history.items()},
        "history_vs_baseline": {name: round(with_history[name] / baseline[name], 2) for name in baseline},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=40_000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    if args.small < 2 * args.requests:
        parser.error("--small must be at least twice --requests (each measure moves nodes of its own)")
    logs.configure(level="warning")
    with mongo("postgresql") as url:
        postgresql_url = os.environ.get("REACTOR_FERRETDB_POSTGRESQL_URL")
        if postgresql_url is None:
            sys.exit("bench/history.py: REACTOR_MONGO_URL names a server without REACTOR_FERRETDB_POSTGRESQL_URL")
        result: dict[str, object] = {"bench": "history", "history": args.history}
        for label, given in (("without_indexes", None), ("with_indexes", postgresql_url)):
            figures = await run(url, given, args)
            result[label] = figures
            print(f"FerretDB/PostgreSQL, {label.replace('_', ' ')}: median ms of one request")
            for name, base in figures["baseline_ms"].items():
                later = figures["history_ms"][name]
                print(
                    f"  {name:<18} {args.small:,} rows: {base:7.2f} ms (baseline)   + {args.history:,} rows of history:"
                    f" {later:7.2f} ms = {later / base:.1f}x"
                )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
