"""Signed events: the CloudEvents extension "Verifiable CloudEvents with DSSE" over the Kafka binary mode.

Pure functions over a message's headers and body (as `reactor.codec.encode` makes them); no bus involved.

What is signed (the extension's `https://cloudevents.io/verifiability/dsse/v0.1`): a DSSE v1.0.2 envelope whose
payload is the JSON verification material

    {"core": Base64(CORE_DIGEST), "ext": Base64(EXT_DIGEST), "signedextattrs": ["causationid", ...]}

    CORE_DIGEST = SHA256(SHA256(id) + SHA256(source) + SHA256(specversion) + SHA256(type) + SHA256(datacontenttype)
                         + SHA256(dataschema) + SHA256(subject) + SHA256(time, UTC, whole seconds, "Z") + SHA256(data))
    EXT_DIGEST  = SHA256(SHA256(value of each attribute named in signedextattrs, in that order))

(an absent attribute hashes as the empty byte sequence; `ext` and `signedextattrs` are both absent when no
extension attribute is signed). The envelope's UTF-8 JSON is the Binary attribute `dssematerial`, whose string
encoding, and so its Kafka header `ce_dssematerial`, is Base64. In the binary mode `datacontenttype` is the
`content-type` header and `data` the message value, byte for byte.

The reactor signs every extension attribute an event carries (`correlationid`, `causationid`, `partitionkey`), and
`verify` refuses an event carrying an extension attribute the signature does not cover: nothing unsigned reaches a
worker (the extension's `strict` mode, refusing where it would drop).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from cryptography.exceptions import InvalidSignature

from reactor.codec import Record
from reactor.errors import DecodeError
from reactor.trust import dsse
from reactor.trust.identities import Identity, TrustStore
from reactor.trust.keys import SigningKey

PAYLOAD_TYPE = "https://cloudevents.io/verifiability/dsse/v0.1"
MATERIAL_ATTRIBUTE = "dssematerial"
MATERIAL_HEADER = "ce_dssematerial"
CONTENT_TYPE_HEADER = "content-type"
# In the order the core digest takes them.
CORE_ATTRIBUTES = ("id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time")
# An envelope with one Ed25519 signature is about 400 bytes of Base64; anything far larger is refused unparsed.
MAX_MATERIAL_BYTES = 8 * 1024
# A header that claims to be a CloudEvents attribute in any letter case (only lower case is one).
_ANY_CE = frozenset({"ce_", "cE_", "Ce_", "CE_"})
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]+$")
# The form the reactor writes (UTC, `T`, `Z`): normalised by cutting the fraction, once the date-time parses.
_CANONICAL_UTC = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?Z$")
_TIMESTAMP = re.compile(
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.[0-9]+)?"
    r"(?P<zone>[Zz]|[+-][0-9]{2}:[0-9]{2})?$"
)
_EMPTY_DIGEST = hashlib.sha256(b"").digest()

Headers = Sequence[tuple[str, bytes]]


class SignatureError(DecodeError):
    """A message whose signature is missing, unknown, invalid or does not cover it; `str()` is `signature: <reason>`.

    A DecodeError, so a consumer sends it to the dead-letter topic with this reason, as any undecodable message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"signature: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verified:
    """Who signed a verified message, and which extension attributes the signature covers."""

    identity: Identity
    extensions: tuple[str, ...]

    @property
    def key_id(self) -> str:
        """The signing key's id."""
        return self.identity.key_id


def is_signed(headers: Headers) -> bool:
    """Whether the message carries a signature at all (it may still be invalid)."""
    return any(name == MATERIAL_HEADER for name, _ in headers)


def sign_headers(
    headers: Headers, body: bytes, key: SigningKey, *, extensions: Sequence[str] | None = None
) -> tuple[tuple[str, bytes], ...]:
    """The headers to add to a binary-mode message to sign it: `(("ce_dssematerial", <Base64 envelope>),)`.

    `extensions`: the extension attributes to cover; by default every one the message carries (sorted), which is
    what `verify_headers` requires. A `ce_dssematerial` in `headers` is not signed over: drop it before adding the
    new one, as `sign_record` does.
    """
    return _sign(headers, body, key, extensions)[0]


def _sign(
    headers: Headers, body: bytes, key: SigningKey, extensions: Sequence[str] | None
) -> tuple[tuple[tuple[str, bytes], ...], tuple[str, ...]]:
    """`sign_headers`, and the extension attributes the signature covers."""
    attributes = _attributes(headers, signing=True)
    attributes.pop(MATERIAL_ATTRIBUTE, None)
    names = tuple(sorted(_extension_names(attributes))) if extensions is None else tuple(extensions)
    problem = _signed_names_problem(names)
    if problem is not None:
        raise ValueError(f"extensions: {problem}")
    material = verification_material(attributes, body, names)
    envelope = dsse.sign(PAYLOAD_TYPE, material, key)
    return ((MATERIAL_HEADER, dsse.b64encode(envelope.to_json()).encode("ascii")),), names


def sign_record(record: Record, key: SigningKey) -> Record:
    """`record` signed: its headers (less any earlier `ce_dssematerial`) plus the signature header."""
    return sign_record_as(record, key)[0]


def sign_record_as(record: Record, key: SigningKey) -> tuple[Record, tuple[str, ...]]:
    """`sign_record`, and the extension attributes its signature covers (every one the record carries): what
    `verify_record` of the result reports, for the key's identity."""
    kept = tuple((name, value) for name, value in record.headers if name != MATERIAL_HEADER)
    added, names = _sign(kept, record.value, key, None)
    return Record(key=record.key, value=record.value, headers=kept + added), names


def verify_headers(headers: Headers, body: bytes, trust: TrustStore) -> Verified:
    """Who signed this binary-mode message; raises SignatureError unless a trusted key signed exactly what it says.

    Follows the extension's verification protocol (material parsed, DSSE signature by a key of `trust`, core and
    extension digests recomputed), then refuses any extension attribute the signature does not cover.
    """
    attributes = _attributes(
        [(name, value) for name, value in headers if name != MATERIAL_HEADER or value], signing=False
    )
    encoded = attributes.pop(MATERIAL_ATTRIBUTE, None)
    if not encoded:
        structured = not set(attributes) - {"datacontenttype"}
        mode = "" if not structured else " (a structured-mode message cannot be verified here: use the binary mode)"
        raise SignatureError(f"unsigned: no {MATERIAL_HEADER} header{mode}")
    if len(encoded) > MAX_MATERIAL_BYTES:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: {len(encoded)} bytes, the limit is {MAX_MATERIAL_BYTES}")
    try:
        envelope = dsse.Envelope.from_json(dsse.b64decode(encoded))
    except dsse.EnvelopeError as exc:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: {exc}") from exc
    if envelope.payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"unknown payloadType {envelope.payload_type!r}, expected {PAYLOAD_TYPE!r}")
    core, ext, names = _parse_material(envelope.payload)
    identity = _signer(envelope, trust)
    if not hmac.compare_digest(core_digest(attributes, body), core):
        raise SignatureError(
            f"tampered: the context attributes or data differ from what {identity.name!r} signed (core digest)"
        )
    if ext is not None and not hmac.compare_digest(extensions_digest(attributes, names), ext):
        raise SignatureError(
            f"tampered: the extension attributes {', '.join(names)} differ from what {identity.name!r} signed"
            " (ext digest)"
        )
    uncovered = sorted(_extension_names(attributes) - set(names))
    if uncovered:
        listed = ", ".join(f"ce_{name}" for name in uncovered)
        raise SignatureError(f"not covered: extension attribute {listed} is not signed by {identity.name!r}")
    return Verified(identity=identity, extensions=names)


def verify_record(record: Record, trust: TrustStore) -> Verified:
    """`verify_headers` of a bus record."""
    return verify_headers(record.headers, record.value, trust)


# --- the extension's algorithm, over CloudEvents attributes by name ---------------------------------------------


def verification_material(attributes: Mapping[str, str], data: bytes, extensions: Sequence[str]) -> bytes:
    """The signed payload: compact JSON with `core`, and `ext` + `signedextattrs` when `extensions` is not empty."""
    core = dsse.b64encode(core_digest(attributes, data))
    if not extensions:
        return f'{{"core":"{core}"}}'.encode()
    ext = dsse.b64encode(extensions_digest(attributes, extensions))
    # Names are [a-z0-9]+ (checked by the caller), so they need no JSON escaping.
    listed = ",".join(f'"{name}"' for name in extensions)
    return f'{{"core":"{core}","ext":"{ext}","signedextattrs":[{listed}]}}'.encode()


def core_digest(attributes: Mapping[str, str], data: bytes) -> bytes:
    """CORE_DIGEST of the extension: the core context attributes (time normalised) and the data."""
    parts = []
    for name in CORE_ATTRIBUTES:
        value = attributes.get(name)
        if value is None:
            parts.append(_EMPTY_DIGEST)
        elif name == "time":
            parts.append(hashlib.sha256(normalize_time(value).encode()).digest())
        else:
            parts.append(hashlib.sha256(value.encode()).digest())
    parts.append(hashlib.sha256(data).digest())
    return hashlib.sha256(b"".join(parts)).digest()


def extensions_digest(attributes: Mapping[str, str], names: Sequence[str]) -> bytes:
    """EXT_DIGEST of the extension: each named extension attribute's value in the given order (String values)."""
    parts = [
        hashlib.sha256(attributes[name].encode()).digest() if name in attributes else _EMPTY_DIGEST for name in names
    ]
    return hashlib.sha256(b"".join(parts)).digest()


def normalize_time(value: str) -> str:
    """An RFC 3339 timestamp in UTC with whole seconds and `Z`, as the extension hashes `time`."""
    if _CANONICAL_UTC.match(value):
        try:
            datetime.fromisoformat(value[:19])  # a real date and time, as the general path checks
        except ValueError as exc:
            raise SignatureError(f"time: {value!r} is not an RFC 3339 date-time: {exc}") from exc
        return value[:19] + "Z"
    match = _TIMESTAMP.match(value)
    if match is None:
        raise SignatureError(f"time: {value!r} is not an RFC 3339 date-time")
    zone = match["zone"]
    try:
        if zone is None or zone in ("Z", "z"):
            offset = UTC  # the extension: a value without a zone is UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            offset = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        moment = datetime.fromisoformat(f"{match['date']}T{match['time']}").replace(tzinfo=offset)
    except ValueError as exc:
        raise SignatureError(f"time: {value!r} is not an RFC 3339 date-time: {exc}") from exc
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


# --- helpers ------------------------------------------------------------------------------------------------------


def _attributes(headers: Headers, *, signing: bool) -> dict[str, str]:
    """CloudEvents attributes by name from binary-mode headers (ce_<name>, and content-type as datacontenttype).

    Refuses what two readers could read differently: a repeated attribute, a ce_ header not in lower case, a value
    that is not UTF-8, an empty value (the digests cannot tell it from an absent one). Other headers (tracing and
    the like) are not part of the event.
    """
    found: dict[str, str] = {}

    def refuse(reason: str) -> SignatureError | ValueError:
        return ValueError(reason) if signing else SignatureError(f"malformed headers: {reason}")

    for header, raw in headers:
        if header[:3] in _ANY_CE:
            name = header[3:]
            if _ATTRIBUTE_NAME.match(name) is None or header[:3] != "ce_":
                raise refuse(f"{header!r} is not ce_ and a lower-case attribute name")
        elif header == CONTENT_TYPE_HEADER:
            name = "datacontenttype"
        else:
            continue
        if name in found:
            raise refuse(f"{header} appears twice")
        if not raw:
            # The extension hashes an empty value as it hashes an absent one; refusing empty values leaves no doubt.
            raise refuse(f"{header} is empty")
        try:
            found[name] = raw.decode()
        except UnicodeDecodeError as exc:
            raise refuse(f"{header} is not UTF-8") from exc
    return found


def _extension_names(attributes: Mapping[str, str]) -> set[str]:
    return set(attributes) - set(CORE_ATTRIBUTES) - {MATERIAL_ATTRIBUTE}


def _signed_names_problem(names: Sequence[str]) -> str | None:
    """What breaks the extension's rules for `signedextattrs`, if anything."""
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or _ATTRIBUTE_NAME.match(name) is None:
            return f"{name!r} is not an attribute name"
        if name in CORE_ATTRIBUTES:
            return f"{name!r} is a core context attribute, always signed"
        if name == MATERIAL_ATTRIBUTE:
            return f"{name!r} is the signature itself"
        if name in seen:
            return f"{name!r} appears twice"
        seen.add(name)
    return None


def _parse_material(payload: bytes) -> tuple[bytes, bytes | None, tuple[str, ...]]:
    """`core`, `ext` and `signedextattrs` of the verification material, each checked as the extension says."""
    try:
        material = dsse.parse_json_object(payload, "verification material")
    except dsse.EnvelopeError as exc:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: {exc}") from exc
    core = _digest_field(material, "core")
    if core is None:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: verification material: core is required")
    ext = _digest_field(material, "ext")
    listed = material.get("signedextattrs")
    if (ext is None) != (listed is None):
        raise SignatureError(f"malformed {MATERIAL_HEADER}: ext and signedextattrs go together, or neither is given")
    if listed is None:
        return core, None, ()
    if not isinstance(listed, list):
        raise SignatureError(f"malformed {MATERIAL_HEADER}: signedextattrs must be a list of attribute names")
    problem = _signed_names_problem(listed)
    if problem is not None:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: signedextattrs: {problem}")
    return core, ext, tuple(listed)


def _digest_field(material: Mapping[str, object], field: str) -> bytes | None:
    value = material.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SignatureError(f"malformed {MATERIAL_HEADER}: verification material: {field} must be a Base64 string")
    try:
        digest = dsse.b64decode(value)
    except dsse.EnvelopeError as exc:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: verification material: {field}: {exc}") from exc
    if len(digest) != hashlib.sha256().digest_size:
        raise SignatureError(f"malformed {MATERIAL_HEADER}: verification material: {field} is not a SHA-256 digest")
    return digest


def _signer(envelope: dsse.Envelope, trust: TrustStore) -> Identity:
    """The trusted identity whose signature verifies (the DSSE protocol, signatures filtered by key id)."""
    message = envelope.pae()
    refused: list[Identity] = []
    for signature in envelope.signatures:
        identity = trust.by_key_id(signature.keyid)
        if identity is None:
            continue
        try:
            identity.public_key.verify(signature.sig, message)
        except InvalidSignature:
            refused.append(identity)
            continue
        return identity
    if refused:
        names = ", ".join(f"{identity.name!r} (key {identity.key_id})" for identity in refused)
        raise SignatureError(f"bad signature: does not verify with the key of {names}")
    key_ids = ", ".join(signature.keyid or "(none)" for signature in envelope.signatures)
    raise SignatureError(f"unknown key: {key_ids} is not in the trust file")
