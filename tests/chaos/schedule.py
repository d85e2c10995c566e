"""A chaos run's faults, drawn from one seed: the same seed gives the same faults in the same order.

What a seed fixes is the plan (which faults, in which order, how long apart, which live worker each one picks,
how long a killed worker stays away and an outage lasts); when each lands relative to the release still depends
on the machine, so a replay repeats the plan, not the exact interleaving.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Kind = Literal["kill", "freeze", "join", "leave", "kafka", "ferretdb"]
WORKER_FAULTS: tuple[Kind, ...] = ("freeze", "join", "leave")


@dataclass(frozen=True)
class Planned:
    """One fault to cause: after `delay_s`, to the live worker at fraction `pick` of them (sorted by start
    order); a killed worker's replacement starts `pause_s` later, an outage lasts `pause_s`."""

    kind: Kind
    delay_s: float
    pick: float
    pause_s: float

    def describe(self) -> str:
        return f"{self.kind}(after {self.delay_s:.1f}s, pick {self.pick:.2f}, pause {self.pause_s:.1f}s)"


def draw(seed: int, *, releases: int, kills: int) -> list[list[Planned]]:
    """The faults of each release of a run: `kills` SIGKILLs, one freeze, one join and one leave shared out over
    the releases in a seeded order, and one outage of each backing service (Kafka, FerretDB) in different
    releases, at a seeded place among that release's faults."""
    rng = random.Random(seed)  # noqa: S311 (a schedule to replay, not a secret)
    kill: Kind = "kill"
    worker: list[Kind] = [kill] * kills + list(WORKER_FAULTS)
    rng.shuffle(worker)
    outages: list[Kind] = ["kafka", "ferretdb"]
    rng.shuffle(outages)
    parts: list[list[Kind]] = [worker[index::releases] for index in range(releases)]
    for index, outage in enumerate(outages):
        part = parts[index % releases]
        part.insert(rng.randint(0, len(part)), outage)
    return [[_planned(kind, rng) for kind in part] for part in parts]


def _planned(kind: Kind, rng: random.Random) -> Planned:
    pause = rng.uniform(1.0, 3.0) if kind in ("kafka", "ferretdb") else rng.uniform(0.0, 1.5)
    return Planned(kind=kind, delay_s=rng.uniform(0.2, 1.5), pick=rng.random(), pause_s=pause)
