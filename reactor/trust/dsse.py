"""DSSE v1.0.2: the pre-authentication encoding (PAE) and the JSON envelope, signed with Ed25519.

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body    (LEN: ASCII decimal, no leading zero)

The signature is over PAE(payloadType, payload), never over the payload alone, so a signature made for one
payload type cannot be passed off under another.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from reactor.trust.keys import SigningKey

# An envelope with more signatures than this is refused unread (no work for whoever floods one).
MAX_SIGNATURES = 8
_STANDARD = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_URL_SAFE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


class EnvelopeError(ValueError):
    """Bytes that are not a DSSE JSON envelope (or a part of one that is not well formed)."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """The pre-authentication encoding that DSSE signs."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def b64encode(data: bytes) -> str:
    """Standard Base64 with padding (RFC 4648 section 4), as the extension's examples use."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Base64 in the standard or the URL-safe alphabet (DSSE allows either), padding optional."""
    try:
        return base64.b64decode(text, validate=True)  # the common case: standard and padded
    except (binascii.Error, ValueError):
        pass
    if _STANDARD.match(text):
        altchars = None
    elif _URL_SAFE.match(text):
        altchars = b"-_"
    else:
        raise EnvelopeError("not Base64")
    stripped = text.rstrip("=")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=altchars, validate=True)
    except binascii.Error as exc:
        raise EnvelopeError(f"not Base64: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature of an envelope: the signer's key id and the raw signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A DSSE JSON envelope, its payload and signatures decoded."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def pae(self) -> bytes:
        """What each signature signs."""
        return pae(self.payload_type, self.payload)

    def to_json(self) -> bytes:
        """Compact JSON, members in the order of the extension's examples."""
        document = {
            "payloadType": self.payload_type,
            "payload": b64encode(self.payload),
            "signatures": [{"keyid": item.keyid, "sig": b64encode(item.sig)} for item in self.signatures],
        }
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        """Parse an envelope; unknown members are ignored (as DSSE requires), duplicate members refused."""
        document = parse_json_object(raw, "envelope")
        payload_type = document.get("payloadType")
        payload = document.get("payload")
        signatures = document.get("signatures")
        if not isinstance(payload_type, str):
            raise EnvelopeError("payloadType: required, a string")
        if not isinstance(payload, str):
            raise EnvelopeError("payload: required, a Base64 string")
        if not isinstance(signatures, list) or not signatures:
            raise EnvelopeError("signatures: required, a non-empty list")
        if len(signatures) > MAX_SIGNATURES:
            raise EnvelopeError(f"signatures: more than {MAX_SIGNATURES}")
        parsed = []
        for index, item in enumerate(signatures):
            if not isinstance(item, dict):
                raise EnvelopeError(f"signatures.{index}: must be an object")
            keyid = item.get("keyid", "")
            sig = item.get("sig")
            if not isinstance(keyid, str):
                raise EnvelopeError(f"signatures.{index}.keyid: must be a string")
            if not isinstance(sig, str):
                raise EnvelopeError(f"signatures.{index}.sig: required, a Base64 string")
            parsed.append(Signature(keyid, _decode(sig, f"signatures.{index}.sig")))
        return cls(payload_type, _decode(payload, "payload"), tuple(parsed))


def sign(payload_type: str, payload: bytes, key: SigningKey) -> Envelope:
    """An envelope of `payload` with one signature by `key`."""
    return Envelope(payload_type, payload, (Signature(key.key_id, key.sign(pae(payload_type, payload))),))


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes; a member given twice is refused (two parsers must never read two values)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        document: dict[str, Any] = {}
        for name, value in pairs:
            if name in document:
                raise EnvelopeError(f"{what}: member {name!r} appears twice")
            document[name] = value
        return document

    try:
        document = json.loads(raw.decode(), object_pairs_hook=unique)
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what}: not UTF-8") from exc
    except EnvelopeError:
        raise
    except (ValueError, RecursionError) as exc:  # deep nesting overflows the parser's recursion
        raise EnvelopeError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise EnvelopeError(f"{what}: must be a JSON object")
    return document


def _decode(text: str, field: str) -> bytes:
    try:
        return b64decode(text)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{field}: {exc}") from exc
