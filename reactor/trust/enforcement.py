"""What a process signs and what it accepts: the buses sign every event they publish and check every message
before it is decoded and handed to a handler (docs/security.md)."""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from dataclasses import dataclass, field

from reactor.codec import Record
from reactor.errors import InvalidInput
from reactor.events import DeployRequested, RollbackRequested
from reactor.trust.identities import Identity, TrustStore
from reactor.trust.keys import SigningKey
from reactor.trust.signing import SignatureError, Verified, sign_record_as, verify_record

# Commands that make an executor change a node: only a reactor identity (a pacer or rollback consumer deriving
# them from a verified release or outcome) may sign them.
NODE_COMMAND_TYPES = frozenset({DeployRequested.TYPE, RollbackRequested.TYPE})

# Verified records remembered per process: a record every consumer group of a process reads (an outcome reaches the
# pacer, the rollback consumer and the CDEvents publisher) is verified once, not once per group.
VERIFIED_CACHE_SIZE = 4096

# Who signed the message a handler is handling (set by the bus around the handler call; None when signatures are
# not checked or the event was handed over in-process).
SIGNER: ContextVar[Identity | None] = ContextVar("reactor_signer", default=None)


def current_signer() -> Identity | None:
    """The verified signer of the message being handled, if it was checked."""
    return SIGNER.get()


@dataclass(frozen=True, slots=True)
class Signatures:
    """This process's signing key (None: it signs nothing), its trusted keys, and whether messages must verify."""

    key: SigningKey | None = None
    trust: TrustStore | None = None
    required: bool = False
    # Identities the deploy policy lets sign a direct node command (the worker checks the policy on each).
    direct_signers: frozenset[str] = frozenset()
    # SHA-256 of a record's exact bytes (`_fingerprint`) -> who signed it, for records that verified with `trust`.
    _verified: dict[bytes, Verified] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.required and self.trust is None:
            raise InvalidInput(
                "trust_file", "REACTOR_REQUIRE_SIGNED is on: set REACTOR_TRUST_FILE to the trusted public keys"
            )

    def sign(self, record: Record) -> Record:
        """`record` signed with this process's key; as it is when there is no key and signatures are optional."""
        if self.key is None:
            if self.required:
                raise InvalidInput(
                    "signing_key",
                    "REACTOR_REQUIRE_SIGNED is on and this process has no key to sign with: set REACTOR_SIGNING_KEY",
                )
            return record
        signed, covered = sign_record_as(record, self.key)
        own = None if self.trust is None else self.trust.by_key_id(self.key.key_id)
        if own is not None:
            # What this process signs with a key it trusts verifies by construction: a consumer group of this same
            # process that reads it back (from Kafka byte for byte, or in-process) takes the result, not the work.
            self._remember(_fingerprint(signed), Verified(identity=own, extensions=covered))
        return signed

    def check(self, record: Record) -> Verified | None:
        """Who signed `record` (None when signatures are optional); raises SignatureError if it may not be used.

        Beyond `verify_record`: node commands must be signed by a reactor identity.
        """
        if not self.required:
            return None
        assert self.trust is not None  # noqa: S101 (__post_init__ refuses required without trust)
        # Verification is a pure function of the record's bytes and the trust store (fixed for this object): the same
        # bytes verified before verify again, to the same signer. Only successes are kept.
        fingerprint = _fingerprint(record)
        verified = self._verified.get(fingerprint)
        if verified is None:
            verified = verify_record(record, self.trust)
            self._remember(fingerprint, verified)
        raw_type = record.header("ce_type")
        event_type = None if raw_type is None else raw_type.decode(errors="replace")
        identity = verified.identity
        if event_type in NODE_COMMAND_TYPES and not identity.reactor and identity.name not in self.direct_signers:
            raise SignatureError(
                f"not a reactor identity: {identity.name!r} (key {verified.key_id}) may not sign"
                f" {event_type}; node commands are signed by reactor identities (reactor: true in the trust file)"
            )
        return verified

    def _remember(self, fingerprint: bytes, verified: Verified) -> None:
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[fingerprint] = verified


def _fingerprint(record: Record) -> bytes:
    """SHA-256 over every header (name and value) in order and the value, each length-prefixed, so that no two
    different records share an input."""
    digest = hashlib.sha256()
    for name, value in record.headers:
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
        digest.update(len(value).to_bytes(4, "big"))
        digest.update(value)
    digest.update(len(record.value).to_bytes(8, "big"))
    digest.update(record.value)
    return digest.digest()


NO_SIGNATURES = Signatures()
