"""Is a conditional update atomic on this MongoDB-protocol server? Found out by racing writers, not by its name.

The store's compare-and-set is one `update_one` whose filter holds the document's identity and the revision the
writer read. On MongoDB that is atomic: one document's update is, and only one of any number of writers that
read the same revision can match it. FerretDB 1.x answers the same command with a query and then an
unconditional write by `_id`, so two writers can both match and both "win". The probe races `WRITERS` writers,
each on a connection of its own, released together from a barrier, all doing that update with the same revision
on one scratch document, for up to `ROUNDS` rounds; a round with other than exactly one winner, or whose stored
document is not the winner's, ends it with "not atomic". The scratch document carries `BALLAST_BYTES` of
padding: a server that reads, changes and writes back the whole document takes milliseconds for it, longer than
the client needs to send every writer's request, so on such a server the writers' reads overlap.

What it can prove: a round with two winners is a witness that the server is not atomic; that verdict is never a
false alarm. What it cannot prove: that a server is atomic. "Atomic" means no race was lost in ROUNDS x WRITERS
tries; a server whose read-to-write window stayed shorter than the client's spread in sending (pymongo spends
some 0.1 ms per request in Python before it writes to the socket) could pass. Measured on FerretDB 1.24 (2 cores,
another CI run busy beside it): without the padding, 16 writers on a shared pool were caught in round 1-100 and
7% of probes on SQLite missed all 100 rounds; with a connection per writer and 256 KiB of padding every one of
100 probes on SQLite and 100 on PostgreSQL was caught in its first round (with the mongo test tier running
beside it: 95 and 99 of 100 in the first round, all by the fifth). An atomic server costs ROUNDS round
trips and WRITERS connections once at start. Who does not want to rely on evidence sets the lock path outright
(REACTOR_MONGO_COMPARE_AND_SET=locked); "atomic" cannot be forced, as nothing else would check it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import uuid4

PROBE_COLLECTION = "compare_and_set_probe"
WRITERS = 16
ROUNDS = 100
BALLAST_BYTES = 256 * 1024
_NO_BALLAST = {"ballast": 0}  # the probe's own reads leave the padding on the server
# A probe document older than this belongs to a process that died while probing.
_STALE_AFTER = timedelta(hours=1)

Document = dict[str, Any]


class UpdateOutcome(Protocol):
    """What the probe reads from an update's result."""

    @property
    def matched_count(self) -> int: ...


class ProbeCollection(Protocol):
    """The few collection calls the probe makes (PyMongo's AsyncCollection has them)."""

    async def insert_one(self, document: Document) -> object: ...

    async def update_one(self, filter: Mapping[str, Any], update: Mapping[str, Any]) -> UpdateOutcome: ...

    async def find_one(self, filter: Any, projection: Any = None) -> Document | None: ...

    async def delete_many(self, filter: Mapping[str, Any]) -> object: ...


@dataclass(frozen=True)
class ProbeResult:
    """The verdict and what it rests on."""

    atomic: bool
    rounds: int  # rounds run
    winners: int  # winners of the last round run (1 in every round when atomic)


async def probe_compare_and_set(writers: Sequence[ProbeCollection], *, rounds: int = ROUNDS) -> ProbeResult:
    """Race one conditional update per writer for up to `rounds` rounds; see the module docstring.

    `writers` are the probe collection as seen by each writer, each through a client with a single connection of
    its own: writers sharing a pool would queue for its connections and take turns instead of racing.
    """
    if len(writers) < 2 or rounds < 1:
        raise ValueError("the probe needs at least two writers and one round")
    first = writers[0]
    now = datetime.now(UTC)
    probe_id = f"probe-{uuid4().hex}"
    await first.delete_many({"created_at": {"$lt": now - _STALE_AFTER}})
    ballast = "x" * BALLAST_BYTES
    await first.insert_one({"_id": probe_id, "revision": 0, "writer": -1, "created_at": now, "ballast": ballast})
    try:
        # Every writer's connection is open before the first round, so no writer lags behind while it connects.
        await asyncio.gather(*(writer.find_one({"_id": probe_id}, _NO_BALLAST) for writer in writers))
        for revision in range(rounds):
            winners = await _race(writers, probe_id, revision)
            stored = await first.find_one({"_id": probe_id}, _NO_BALLAST)
            if len(winners) != 1 or stored is None or stored.get("writer") != winners[0]:
                return ProbeResult(atomic=False, rounds=revision + 1, winners=len(winners))
        return ProbeResult(atomic=True, rounds=rounds, winners=1)
    finally:
        await first.delete_many({"_id": probe_id})


async def _race(writers: Sequence[ProbeCollection], probe_id: str, revision: int) -> list[int]:
    """The writers that matched `revision`, all released at once from a barrier."""
    barrier = asyncio.Barrier(len(writers))

    async def write(index: int, writer: ProbeCollection) -> bool:
        await barrier.wait()
        result = await writer.update_one(
            {"_id": probe_id, "revision": revision}, {"$set": {"revision": revision + 1, "writer": index}}
        )
        return result.matched_count == 1

    won = await asyncio.gather(*(write(index, writer) for index, writer in enumerate(writers)))
    return [index for index, matched in enumerate(won) if matched]
