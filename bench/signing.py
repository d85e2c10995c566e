"""Cost of signing and verifying one event, against encoding and decoding the same event, measured in the same run.

    python bench/signing.py [--events 2000] [--repeat 5]

Per event: `sign_record` (verification material, DSSE envelope, one Ed25519 signature) and `verify_record`
(parse, one Ed25519 verification, digests recomputed); baseline: `codec.encode` (JSON body and CloudEvents
headers) and `codec.decode` (header rules, JSON, pydantic validation) of the same DeployRequested, which every
producer and consumer pays already. A node sees about four signed events (command, outcome and the release
events around it), each signed once and verified once: the per-node figure is four of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reactor.codec import Record, decode, encode
from reactor.events import DeployRequested, Package
from reactor.trust import Identity, SigningKey, TrustStore, sign_record, verify_record

EVENTS_PER_NODE = 4
TARGET_PER_NODE_MS = 0.25


def events(count: int) -> list[DeployRequested]:
    """`count` distinct commands of realistic size."""
    return [
        DeployRequested(
            node_key=f"physical/web-{index:05d}.prod.example.test/shop",
            service="shop",
            version="2.4.1",
            package=Package(url="https://artifacts.example.test/shop/shop-2.4.1.tar.gz", sha256="ab" * 32),
            port=8080,
            release_id="shop-2.4.1",
            causation_id=f"8d0c1e7a-1111-4a5b-9c3d-{index:012d}",
            actor="ci-pipeline",
        )
        for index in range(count)
    ]


def per_item_us(operation: Callable[[int], object], count: int, repeat: int) -> float:
    """Median over `repeat` rounds of the mean CPU time per item of `operation` over `count` items, in µs.

    CPU time of this process, not wall time: on a busy machine wall time counts the waits for a core too.
    """
    rounds = []
    for _ in range(repeat):
        start = time.process_time()
        for index in range(count):
            operation(index)
        rounds.append((time.process_time() - start) / count * 1e6)
    return statistics.median(rounds)


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    count: int = args.events

    key = SigningKey.from_private_key(Ed25519PrivateKey.generate())
    trust = TrustStore(
        [Identity.of("ci", key.public_key)]
        + [Identity.of(f"other-{index}", Ed25519PrivateKey.generate().public_key()) for index in range(50)]
    )
    commands = events(count)
    records: list[Record] = [encode(event, "/ci/pipeline") for event in commands]
    signed = [sign_record(record, key) for record in records]
    message = b"x" * 200

    encode_us = per_item_us(lambda index: encode(commands[index], "/ci/pipeline"), count, args.repeat)
    decode_us = per_item_us(lambda index: decode(records[index]), count, args.repeat)
    sign_us = per_item_us(lambda index: sign_record(records[index], key), count, args.repeat)
    verify_us = per_item_us(lambda index: verify_record(signed[index], trust), count, args.repeat)
    raw_sign_us = per_item_us(lambda _: key.sign(message), count, args.repeat)
    public_key = key.public_key
    signature = key.sign(message)
    raw_verify_us = per_item_us(lambda _: public_key.verify(signature, message), count, args.repeat)

    header_bytes = len(signed[0].header("ce_dssematerial") or b"")
    per_node_ms = EVENTS_PER_NODE * (sign_us + verify_us) / 1000
    print(f"events: {count} DeployRequested, body {len(records[0].value)} B, signature header {header_bytes} B")
    print(f"{'operation':<34}{'µs/event':>10}{'x baseline':>12}")
    print(f"{'encode (baseline for sign)':<34}{encode_us:>10.1f}{1:>12.2f}")
    print(f"{'sign_record':<34}{sign_us:>10.1f}{sign_us / encode_us:>12.2f}")
    print(f"{'  of which raw Ed25519 sign':<34}{raw_sign_us:>10.1f}{raw_sign_us / encode_us:>12.2f}")
    print(f"{'decode (baseline for verify)':<34}{decode_us:>10.1f}{1:>12.2f}")
    print(f"{'verify_record':<34}{verify_us:>10.1f}{verify_us / decode_us:>12.2f}")
    print(f"{'  of which raw Ed25519 verify':<34}{raw_verify_us:>10.1f}{raw_verify_us / decode_us:>12.2f}")
    verdict = "within" if per_node_ms <= TARGET_PER_NODE_MS else "OVER"
    print(
        f"per node ({EVENTS_PER_NODE} events signed once and verified once): {per_node_ms:.3f} ms,"
        f" {verdict} the {TARGET_PER_NODE_MS} ms target"
    )


if __name__ == "__main__":
    main()
