"""`reactor keys generate` and what `reactor verify` reports for each kind of message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reactor.cli import documents
from reactor.codec import Record, encode
from reactor.events import DeployRequested, NodeDeployed, Package
from reactor.trust import Identity, SigningKey, TrustStore, load_signing_key, sign_record
from reactor.trust.audit import check_records

pytestmark = pytest.mark.unit

NODE = "local/node-1/app"
PACKAGE = Package(url="https://packages.example.com/app-2.0.0.tar.gz", sha256="a" * 64)


@dataclass(frozen=True)
class Ran:
    exit_code: int
    stdout: str
    stderr: str


def reactor(*args: str, env: dict[str, str] | None = None) -> Ran:
    """The CLI in a process of its own, as a user runs it (in this process it would configure this one's logging)."""
    done = subprocess.run(
        [sys.executable, "-m", "reactor.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def _key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


def test_keys_generate_writes_a_private_key_only_its_owner_reads_and_prints_its_key_id(tmp_path: Path) -> None:
    """NAME.key is 0600, NAME.pub is beside it, and the printed id is the key's own id."""
    result = reactor("keys", "generate", "executor", "--dir", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.stderr
    private = tmp_path / "keys" / "executor.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "executor.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert result.stdout.strip() == load_signing_key(private).key_id


def test_keys_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    """A second key of the same name is refused as invalid input (exit 2), and the first stays as it was."""
    assert reactor("keys", "generate", "ci", "--dir", str(tmp_path)).exit_code == 0
    before = (tmp_path / "ci.key").read_bytes()
    again = reactor("keys", "generate", "ci", "--dir", str(tmp_path))
    assert again.exit_code == 2
    assert "already exists" in again.stderr
    assert (tmp_path / "ci.key").read_bytes() == before


def test_keys_generate_refuses_a_name_that_is_not_a_file_name(tmp_path: Path) -> None:
    """A name with a path in it would write elsewhere: refused, nothing written."""
    result = reactor("keys", "generate", "../evil", "--dir", str(tmp_path))
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_check_records_names_the_signer_of_each_good_message_and_the_reason_of_each_bad_one() -> None:
    """Signed by a trusted reactor key: verified with its name; unsigned, unknown key or tampered: the reason."""
    reactor, stranger = _key(), _key()
    trust = TrustStore([Identity.of("reactor-executor", reactor.public_key, reactor=True)])
    deploy = DeployRequested(node_key=NODE, service="app", version="2.0.0", package=PACKAGE, actor="ci")
    good = sign_record(encode(NodeDeployed(node_key=NODE, service="app", version="2.0.0"), "/reactor"), reactor)
    unsigned = encode(deploy, "/ci")
    unknown = sign_record(encode(deploy, "/ci"), stranger)
    signed = sign_record(encode(deploy, "/ci"), reactor)
    tampered = Record(key=signed.key, value=signed.value.replace(b"2.0.0", b"6.6.6"), headers=signed.headers)

    checks = check_records([good, unsigned, unknown, tampered], trust)

    assert [check.verified for check in checks] == [True, False, False, False]
    assert (checks[0].signer, checks[0].key_id, checks[0].reactor) == ("reactor-executor", reactor.key_id, True)
    assert checks[0].event_type == NodeDeployed.TYPE
    problems = [str(check.problem) for check in checks[1:]]
    assert problems[0].startswith("signature: unsigned")
    assert problems[1].startswith("signature: unknown key")
    assert problems[2].startswith("signature: tampered")
    assert checks[3].event_id == deploy.event_id
    assert checks[3].subject == NODE


def test_verification_document_counts_and_lists_every_message() -> None:
    """`--output json`: the topic, totals, and per message its verdict, signer and problem."""
    key = _key()
    trust = TrustStore([Identity.of("ci", key.public_key)])
    deploy = DeployRequested(node_key=NODE, service="app", version="2.0.0", package=PACKAGE, actor="ci")
    checks = check_records([sign_record(encode(deploy, "/ci"), key), encode(deploy, "/ci")], trust)
    document = documents.verification("commands", checks)
    assert document["topic"] == "commands"
    assert (document["total"], document["verified"]) == (2, 1)
    first, second = document["records"]
    assert first == {
        "position": 0,
        "type": DeployRequested.TYPE,
        "id": deploy.event_id,
        "subject": NODE,
        "verified": True,
        "signer": "ci",
        "key_id": key.key_id,
        "reactor": False,
        "problem": None,
    }
    assert second["verified"] is False
    assert second["problem"].startswith("signature: unsigned")


def test_verify_needs_the_distributed_mode_and_a_trust_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded mode has no topic to read; distributed mode without REACTOR_TRUST_FILE has nothing to verify with."""
    monkeypatch.delenv("REACTOR_TRUST_FILE", raising=False)
    embedded = reactor(
        "verify", "--topic", "outcomes", env={"REACTOR_STATE_DIR": str(tmp_path), "REACTOR_MODE": "embedded"}
    )
    assert embedded.exit_code == 2
    assert "REACTOR_MODE=distributed" in embedded.stderr
    untrusting = reactor(
        "verify", "--topic", "outcomes", env={"REACTOR_STATE_DIR": str(tmp_path), "REACTOR_MODE": "distributed"}
    )
    assert untrusting.exit_code == 2
    assert "REACTOR_TRUST_FILE" in untrusting.stderr
