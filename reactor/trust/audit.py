"""Who signed each message of a topic: what `reactor verify` reports, as plain data over bus records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reactor.codec import Record
from reactor.trust.identities import TrustStore
from reactor.trust.signing import SignatureError, verify_record


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """One message's verdict: its event type, id and subject as its headers say, and its signer or why it failed."""

    position: int
    event_type: str | None
    event_id: str | None
    subject: str | None
    signer: str | None = None
    key_id: str | None = None
    reactor: bool = False
    problem: str | None = None

    @property
    def verified(self) -> bool:
        """Whether a trusted key signed exactly this message."""
        return self.problem is None


def check_records(records: Iterable[Record], trust: TrustStore) -> list[RecordCheck]:
    """Verify every record; one verdict each, in order. Never raises for a bad message: it is reported."""
    checks = []
    for position, record in enumerate(records):
        shown = {name: _header(record, name) for name in ("ce_type", "ce_id", "ce_subject")}
        try:
            verified = verify_record(record, trust)
        except SignatureError as exc:
            checks.append(
                RecordCheck(position, shown["ce_type"], shown["ce_id"], shown["ce_subject"], problem=str(exc))
            )
            continue
        identity = verified.identity
        checks.append(
            RecordCheck(
                position,
                shown["ce_type"],
                shown["ce_id"],
                shown["ce_subject"],
                signer=identity.name,
                key_id=identity.key_id,
                reactor=identity.reactor,
            )
        )
    return checks


def _header(record: Record, name: str) -> str | None:
    value = record.header(name)
    return None if value is None else value.decode(errors="replace")
