"""Pure orchestration overhead of the embedded reactor: one release, no-op executor, no work to wait for.

    python bench/pacer.py [--nodes 10000] [--batches 10] [--max-parallel 500] [--signing-nodes 2000]

The executor does nothing, so everything measured is the reactor's own cost per node: pacing, the bus,
the claim and status writes, the outcome and its counting. Baseline in the same run: the same number of
no-op executor calls made directly in a loop (what the work itself costs).

Signing: three more releases of `--signing-nodes` nodes, every event through the codec as on Kafka: unsigned (the
baseline); signed (Ed25519) with every record verified once, as when each role runs in a process of its own; and
signed in one process, which takes what it signed itself as verified (embedded mode, `--role all`). The CPU
difference per node is the cost of signatures, next to the bare Ed25519 operations it made (0 skips them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.bus import release, rss_mb, run_release
from reactor import logs
from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.codec import Record
from reactor.domain.status import pending
from reactor.events import Strategy
from reactor.executors.noop import NoopExecutor
from reactor.ports import ExecutionContext
from reactor.runtime import tune_gc
from reactor.settings import Settings
from reactor.trust import TrustStore, enforcement, generate_key, load_signing_key, load_trust_file
from reactor.trust.enforcement import NO_SIGNATURES, Signatures
from reactor.trust.signing import Verified, sign_record, verify_record


async def direct_calls(count: int) -> float:
    """Seconds for `count` no-op executor deploys called directly."""
    begin = time.perf_counter()
    for index in range(count):
        key = f"noop/host-{index:05d}/app"
        context = ExecutionContext(
            node_key=key, service="app", host=f"host-{index:05d}", current=pending(key, "app"), target_version="1"
        )
        await NoopExecutor(context).deploy()
    return time.perf_counter() - begin


class _Counting(Signatures):
    """Signatures that count the signing and checking they do (`verified`: checks not answered from the cache)."""

    signed = 0
    checked = 0
    verified = 0

    def sign(self, record: Record) -> Record:
        _Counting.signed += 1
        return super().sign(record)

    def check(self, record: Record) -> Verified | None:
        _Counting.checked += 1
        return super().check(record)

    @classmethod
    def reset(cls) -> None:
        cls.signed = cls.checked = cls.verified = 0


class _Apart(_Counting):
    """As if every record were read by another process: what this process signs is verified when read (the
    consumer groups of one process still share one verification of a record)."""

    def sign(self, record: Record) -> Record:
        _Counting.signed += 1
        assert self.key is not None
        return sign_record(record, self.key)


Run = tuple[float, float]  # seconds of wall-clock time, seconds of this process's CPU time


@dataclass
class SignedRun:
    """One signed release: wall and CPU seconds, and per node the signatures made, checks and verifications."""

    run: Run
    signed: float
    checked: float
    verified: float


def _counting_verify(record: Record, trust: TrustStore) -> Verified:
    _Counting.verified += 1
    return verify_record(record, trust)


def raw_ed25519_ms(signs: float, verifies: float, rounds: int = 2000) -> float:
    """Milliseconds of bare Ed25519 (OpenSSL through `cryptography`) for `signs` signatures and `verifies`
    verifications of a 200-byte message: the floor no signing scheme with those counts gets under."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    message = bytes(200)
    signature = key.sign(message)
    begin = time.process_time()
    for _ in range(rounds):
        key.sign(message)
    sign_ms = (time.process_time() - begin) / rounds * 1000
    begin = time.process_time()
    for _ in range(rounds):
        public.verify(signature, message)
    verify_ms = (time.process_time() - begin) / rounds * 1000
    return signs * sign_ms + verifies * verify_ms


async def signing_runs(nodes: int, max_parallel: int, batches: int) -> tuple[Run, SignedRun, SignedRun]:
    """A release through the codec unsigned; signed with every record verified once (as by separate processes);
    signed in one process, which does not verify again what it signed itself."""
    setattr(enforcement, "verify_record", _counting_verify)  # noqa: B010 (counted, same behaviour)
    plan = release(nodes, max_parallel=max_parallel)
    plan = plan.model_copy(update={"strategy": Strategy(batches=[max(nodes // batches, 1)], max_parallel=max_parallel)})
    results: list[SignedRun] = []
    with tempfile.TemporaryDirectory(prefix="reactor-bench-signing-") as work:
        root = Path(work)
        generate_key("reactor", root / "keys")
        (root / "keys" / "trust.yaml").write_text("- name: reactor\n  public_key: reactor.pub\n  reactor: true\n")
        key = load_signing_key(root / "keys" / "reactor.key")
        trust = load_trust_file(root / "keys" / "trust.yaml")
        modes: list[tuple[str, Signatures]] = [
            ("off", NO_SIGNATURES),
            ("apart", _Apart(key=key, trust=trust, required=True)),
            ("one-process", _Counting(key=key, trust=trust, required=True)),
        ]
        for name, signatures in modes:
            settings = Settings(
                state_dir=root / f"state-{name}",
                concurrency=max_parallel + 64,
                require_signed=signatures.required,
                signing_key=root / "keys" / "reactor.key" if signatures.required else None,
            )
            _Counting.reset()
            async with (
                MemoryBus(concurrency=max_parallel + 64, through_codec=True, signatures=signatures) as bus,
                EmbeddedStore(root / f"signed-{name}.db") as store,
            ):
                run_plan = plan.model_copy(update={"release_id": f"{plan.release_id}-{name}"})
                cpu_before = time.process_time()
                elapsed, _peak = await run_release(bus, store, run_plan, settings)
                cpu_s = time.process_time() - cpu_before
            counts = (_Counting.signed / nodes, _Counting.checked / nodes, _Counting.verified / nodes)
            results.append(SignedRun((elapsed, cpu_s), *counts))
    return results[0].run, results[1], results[2]


async def main() -> None:
    logs.configure("json", "warning")
    tune_gc()  # the garbage collector as the `reactor` command sets it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--max-parallel", type=int, default=500)
    parser.add_argument("--signing-nodes", type=int, default=2000)
    args = parser.parse_args()
    nodes: int = args.nodes
    plan = release(nodes, max_parallel=args.max_parallel)
    plan = plan.model_copy(
        update={"strategy": Strategy(batches=[nodes // args.batches], max_parallel=args.max_parallel)}
    )
    before = rss_mb()
    with tempfile.TemporaryDirectory(prefix="reactor-bench-") as work:
        settings = Settings(state_dir=Path(work), concurrency=args.max_parallel + 64)
        # The bus keeps the history the embedded runtime keeps (REACTOR_MEMORY_HISTORY), not every event forever.
        bus = MemoryBus(concurrency=args.max_parallel + 64, history_limit=settings.memory_history)
        async with bus, EmbeddedStore(Path(work) / "b.db") as store:
            cpu_before = time.process_time()
            reactor_s, peak = await run_release(bus, store, plan, settings, sample_rss=True)
            reactor_cpu_s = time.process_time() - cpu_before
    cpu_before = time.process_time()
    work_s = await direct_calls(nodes)
    work_cpu_s = time.process_time() - cpu_before
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    overhead_ms = (reactor_s - work_s) / nodes * 1000
    # This process's CPU time too: on a shared machine the wall clock also measures the neighbours.
    overhead_cpu_ms = (reactor_cpu_s - work_cpu_s) / nodes * 1000
    print(f"nodes: {nodes} in {args.batches} batches, max_parallel {args.max_parallel}, embedded mode")
    print(f"executor work alone (direct no-op calls): {work_s:8.3f} s  (baseline)")
    print(f"reactor, whole release:                   {reactor_s:8.3f} s  = {reactor_s / work_s:.0f}x the work")
    print(f"orchestration overhead per node: {overhead_ms:.3f} ms (target <= 0.1 ms at 10,000 nodes)")
    print(
        f"CPU time of this process: reactor {reactor_cpu_s:.3f} s, work {work_cpu_s:.3f} s"
        f" ({reactor_cpu_s / work_cpu_s:.0f}x); overhead {overhead_cpu_ms:.3f} ms of CPU per node"
    )
    print(
        f"RSS: {before:.0f} MB before, {peak:.0f} MB peak sampled, {max_rss:.0f} MB max"
        " (target <= 300 MB at 100,000 nodes)"
    )
    # The last line: one JSON object, for scripts and the issue notes.
    result: dict[str, object] = {
        "bench": "pacer",
        "nodes": nodes,
        "overhead_ms_per_node": round(overhead_ms, 4),
        "overhead_cpu_ms_per_node": round(overhead_cpu_ms, 4),
        "work_s": round(work_s, 4),
        "reactor_s": round(reactor_s, 4),
        "rss_mb": round(max_rss, 1),
    }
    if args.signing_nodes:
        count = args.signing_nodes
        (unsigned_s, unsigned_cpu), apart, together = await signing_runs(count, args.max_parallel, args.batches)
        print(f"signing: {count} nodes, every event through the codec as on Kafka (wall / CPU of this process)")
        print(f"  unsigned:                         {unsigned_s:8.3f} s / {unsigned_cpu:8.3f} s CPU  (baseline)")
        signing: dict[str, object] = {"nodes": count}
        result["signing"] = signing
        for label, key, run in (
            ("signed, each record verified once", "verified_once", apart),
            ("signed, in one process", "one_process", together),
        ):
            signed_s, signed_cpu = run.run
            # CPU time: the machine may be shared, and the wall clock then measures the neighbours too.
            cost_ms = (signed_cpu - unsigned_cpu) / count * 1000
            floor_ms = raw_ed25519_ms(run.signed, run.verified)
            print(f"  {label + ':':<33}{signed_s:8.3f} s / {signed_cpu:8.3f} s CPU")
            print(
                f"    cost {cost_ms:.3f} ms CPU per node (target <= 0.25 ms), {signed_cpu / unsigned_cpu:.2f}x the"
                f" unsigned CPU; per node {run.signed:.1f} signed, {run.checked:.1f} checked, {run.verified:.1f}"
                f" verified; bare Ed25519 for those: {floor_ms:.3f} ms ({cost_ms / floor_ms:.2f}x of it)"
            )
            signing[key] = {
                "cost_ms_per_node": round(cost_ms, 4),
                "ed25519_floor_ms_per_node": round(floor_ms, 4),
                "signed_per_node": round(run.signed, 2),
                "checked_per_node": round(run.checked, 2),
                "verified_per_node": round(run.verified, 2),
                "cpu_ratio_to_unsigned": round(signed_cpu / unsigned_cpu, 3),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
