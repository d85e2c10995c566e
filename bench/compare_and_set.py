"""put_node throughput with lock documents and with the one-update compare-and-set, on one server, same run.

    REACTOR_MONGO_URL=mongodb://... python bench/compare_and_set.py [--nodes 200] [--updates 5] [--concurrency 16]

Each node is written `--updates` times in a row by one writer, `--concurrency` nodes at once. No two writers ever
share a node, so the one-update path is exact here even on a server the probe finds not atomic (FerretDB): it is
switched on by hand for this measurement only, which the store itself never does. Also times opening a store with
the probe and with the lock path forced. The last line is one JSON object: {"bench": "compare_and_set",
"writes_per_s": {"locked": x, "atomic": x}, "ratio_atomic_to_locked": x, "open_ms": {"probe": x, "locked": x}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactor.adapters.mongo_store import CompareAndSet, CompareAndSetSetting, MongoStore
from reactor.domain.status import NodeState, NodeStatus, pending


async def writes_per_s(url: str, mode: CompareAndSet, nodes: int, updates: int, concurrency: int) -> float:
    """Conditional writes per second through `mode`, on a database of their own."""
    database = f"bench_{uuid.uuid4().hex[:8]}"
    async with MongoStore(url, database=database, compare_and_set="locked") as store:
        store.compare_and_set = mode  # by hand, for this measurement only: see the module docstring
        first = [
            await store.put_node(pending(f"local/h{index}/api", "api"), expected_revision=0) for index in range(nodes)
        ]
        gate = asyncio.Semaphore(concurrency)

        async def write(status: NodeStatus | None) -> None:
            async with gate:
                for _ in range(updates):
                    assert status is not None
                    changed = status.model_copy(update={"state": NodeState.DEPLOYING})
                    status = await store.put_node(changed, expected_revision=status.revision)

        started = time.monotonic()
        await asyncio.gather(*(write(status) for status in first))
        elapsed = time.monotonic() - started
        await store.db.client.drop_database(database)
    return nodes * updates / elapsed


async def open_ms(url: str, setting: CompareAndSetSetting) -> float:
    database = f"bench_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    async with MongoStore(url, database=database, compare_and_set=setting) as store:
        elapsed = time.monotonic() - started
        await store.db.client.drop_database(database)
    return elapsed * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    url = os.environ.get("REACTOR_MONGO_URL")
    if not url:
        sys.exit('set REACTOR_MONGO_URL (e.g. eval "$(scripts/testenv up mongo --backend postgresql)")')
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # alternated, so a busy spell of the machine hits both alike
        for mode in ("locked", "atomic"):
            rate = await writes_per_s(url, mode, args.nodes, args.updates, args.concurrency)
            best[mode] = max(best.get(mode, 0.0), rate)
    opening = {setting: min([await open_ms(url, setting) for _ in range(3)]) for setting in ("probe", "locked")}
    print(
        json.dumps(
            {
                "bench": "compare_and_set",
                "nodes": args.nodes,
                "writes_per_s": {mode: round(rate, 1) for mode, rate in best.items()},
                "ratio_atomic_to_locked": round(best["atomic"] / best["locked"], 2),
                "open_ms": {setting: round(ms, 1) for setting, ms in opening.items()},
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
