"""What the history of finished requests costs a worker on FerretDB, and what pruning it gives back.

    python bench/processed.py [--backend postgresql] [--history 100000] [--reads 200]

Every command a worker takes starts with a read of its recorded outcome (`get_processed`, one `_id` lookup). FerretDB
1.x serves no query from an index of its own (tests/behaviour/test_mongo_explain.py; on PostgreSQL the store's own
indexes serve it, bench/history.py, not used here), so that read decodes every record there
is. Measured, on one store: the read with `--keep` (1,000) records of the last week (the baseline), then with
`--history` more records finished more than a week ago (what every command ever run leaves behind without
pruning), then once `prune_processed` (what the executor runs at start and hourly) has forgotten those.

Uses $REACTOR_MONGO_URL when set, else starts FerretDB with the test harness on `--backend`. The last line is one
JSON object: {"bench": "processed", "backend": b, "history": n, "read_ms": {"baseline": x, "with_history": x,
"pruned": x}, "with_history_vs_baseline": x, "pruned_vs_baseline": x, "prune_s": x}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus import mongo
from reactor import logs
from reactor.adapters.mongo_store import MongoStore

_INSERT_CHUNK = 1000


async def fill(store: MongoStore, prefix: str, count: int, at: datetime) -> None:
    """`count` records finished from `at` on, a millisecond apart, inserted 1,000 a request."""
    for start in range(0, count, _INSERT_CHUNK):
        documents = [
            {"_id": f"{prefix}-{index}", "outcome": "{}", "at": at + timedelta(milliseconds=index)}
            for index in range(start, min(count, start + _INSERT_CHUNK))
        ]
        await store.db["processed"].insert_many(documents)


async def read_ms(store: MongoStore, ids: list[str]) -> float:
    """The median milliseconds of one `get_processed`, over reads of `ids` one after another."""
    times = []
    for event_id in ids:
        begin = time.perf_counter()
        assert await store.get_processed(event_id) is not None
        times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="postgresql", choices=["postgresql", "sqlite"])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--keep", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    logs.configure(level="warning")
    now = datetime.now(UTC)
    ids = [f"recent-{index * args.keep // args.reads}" for index in range(args.reads)]
    with mongo(args.backend) as url:
        async with MongoStore(url, database=f"bench_{uuid.uuid4().hex[:8]}") as store:
            await fill(store, "recent", args.keep, now - timedelta(hours=1))
            baseline = await read_ms(store, ids)
            await fill(store, "old", args.history, now - timedelta(days=8))
            with_history = await read_ms(store, ids)
            begin = time.perf_counter()
            pruned = await store.prune_processed(now - timedelta(days=7))
            prune_s = time.perf_counter() - begin
            assert pruned == args.history, pruned
            after = await read_ms(store, ids)
            await store.db.client.drop_database(store.database)
    print(f"FerretDB on {args.backend}: get_processed, median of {args.reads} reads")
    print(f"  {args.keep:>7,} records of the last week:            {baseline:8.2f} ms  (baseline)")
    print(f"  + {args.history:,} finished over a week ago:  {with_history:8.2f} ms  = {with_history / baseline:.1f}x")
    print(f"  after pruning them ({prune_s:.1f} s, once):           {after:8.2f} ms  = {after / baseline:.1f}x")
    print(
        json.dumps(
            {
                "bench": "processed",
                "backend": args.backend,
                "history": args.history,
                "read_ms": {
                    "baseline": round(baseline, 3),
                    "with_history": round(with_history, 3),
                    "pruned": round(after, 3),
                },
                "with_history_vs_baseline": round(with_history / baseline, 2),
                "pruned_vs_baseline": round(after / baseline, 2),
                "prune_s": round(prune_s, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
