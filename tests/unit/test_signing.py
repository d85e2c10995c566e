"""Signed events (Verifiable CloudEvents with DSSE), keys and the trust file.

Every change an attacker can make to a signed message is refused with a reason that starts with `signature:`; our
envelopes verify with an independent DSSE implementation (securesystemslib); the extension's own test vectors and
a hand-computed vector pin the wire format.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.exceptions import VerificationError

# Documented at securesystemslib.signer, which re-exports them without __all__ (so mypy calls them private).
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from reactor.codec import Record, decode, encode
from reactor.errors import DecodeError, InvalidInput
from reactor.events import DeployRequested, NodeDeployed, NodeTarget, Package, ReleasePlan, ReleaseRequested
from reactor.trust import (
    Identity,
    SignatureError,
    SigningKey,
    TrustStore,
    dsse,
    generate_key,
    is_signed,
    key_id,
    load_signing_key,
    load_trust_file,
    sign_headers,
    sign_record,
    verify_headers,
    verify_record,
)
from reactor.trust.keys import public_key_pem
from reactor.trust.signing import (
    MATERIAL_HEADER,
    PAYLOAD_TYPE,
    core_digest,
    extensions_digest,
    normalize_time,
    verification_material,
)

pytestmark = pytest.mark.unit

Headers = tuple[tuple[str, bytes], ...]


def new_key() -> SigningKey:
    return SigningKey.from_private_key(Ed25519PrivateKey.generate())


CI = new_key()
EXECUTOR = new_key()
STRANGER = new_key()
TRUST = TrustStore([Identity.of("ci", CI.public_key), Identity.of("executor", EXECUTOR.public_key, reactor=True)])


def deploy() -> DeployRequested:
    return DeployRequested(
        node_key="physical/web-1/shop",
        service="shop",
        version="2.4.1",
        package=Package(url="https://artifacts.example.test/shop-2.4.1.tar.gz", sha256="ab" * 32),
        release_id="shop-2.4.1",
        causation_id="8d0c1e7a-1111-4a5b-9c3d-000000000001",
        occurred_at=datetime(2026, 5, 13, 9, 49, 12, 123456, tzinfo=UTC),
    )


def signed_deploy(key: SigningKey = CI) -> Record:
    return sign_record(encode(deploy(), "/ci/pipeline"), key)


def refusal(record: Record, trust: TrustStore = TRUST) -> str:
    """The reason `record` is refused; every reason starts with `signature: `."""
    with pytest.raises(SignatureError) as caught:
        verify_record(record, trust)
    message = str(caught.value)
    assert message.startswith("signature: ")
    return message


def with_header(record: Record, name: str, value: bytes | None) -> Record:
    """`record` with header `name` set to `value` (or removed), keeping the other headers in place."""
    headers = [(key, item) for key, item in record.headers if key != name]
    if value is not None:
        headers.append((name, value))
    return Record(key=record.key, value=record.value, headers=tuple(headers))


def header(record: Record, name: str) -> bytes:
    value = record.header(name)
    assert value is not None
    return value


def envelope_of(record: Record) -> dict[str, Any]:
    document = json.loads(base64.b64decode(header(record, MATERIAL_HEADER)))
    assert isinstance(document, dict)
    return document


def with_envelope(record: Record, document: dict[str, Any]) -> Record:
    encoded = base64.b64encode(json.dumps(document).encode())
    return with_header(record, MATERIAL_HEADER, encoded)


def with_material(record: Record, material: bytes, key: SigningKey = CI) -> Record:
    """`record` carrying `material`, validly DSSE-signed by `key` (what a holder of a trusted key could send)."""
    envelope = dsse.sign(PAYLOAD_TYPE, material, key)
    return with_header(record, MATERIAL_HEADER, dsse.b64encode(envelope.to_json()).encode())


# --- round trip -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        deploy(),
        NodeDeployed(node_key="physical/web-1/shop", service="shop", version="2.4.1", release_id="shop-2.4.1"),
        ReleaseRequested(
            release_id="shop-2.4.1",
            plan=ReleasePlan(
                release_id="shop-2.4.1",
                service="shop",
                version="2.4.1",
                image="registry.example.test/shop:2.4.1",
                nodes=[NodeTarget(node_key="k8s/prod/shop/deployment/shop")],
            ),
        ),
    ],
    ids=lambda event: type(event).__name__,
)
def test_a_signed_event_verifies_as_its_signer_and_still_decodes_to_the_same_event(event: DeployRequested) -> None:
    record = sign_record(encode(event, "/reactor"), EXECUTOR)

    verified = verify_record(record, TRUST)

    assert verified.identity.name == "executor"
    assert verified.identity.reactor
    assert verified.key_id == EXECUTOR.key_id
    assert set(verified.extensions) <= {"correlationid", "causationid", "partitionkey"}
    assert "partitionkey" in verified.extensions
    assert decode(record)[0] == event
    assert is_signed(record.headers)
    assert not is_signed(encode(event, "/reactor").headers)


def test_sign_headers_returns_only_the_signature_header_and_covers_every_extension_attribute() -> None:
    record = encode(deploy(), "/ci/pipeline")

    added = sign_headers(record.headers, record.value, CI)

    assert [name for name, _ in added] == [MATERIAL_HEADER]
    verified = verify_headers(record.headers + added, record.value, TRUST)
    assert verified.extensions == ("causationid", "correlationid", "partitionkey")


def test_signing_again_replaces_the_earlier_signature() -> None:
    record = sign_record(signed_deploy(CI), EXECUTOR)

    assert [name for name, _ in record.headers].count(MATERIAL_HEADER) == 1
    assert verify_record(record, TRUST).identity.name == "executor"


def test_headers_that_are_not_attributes_are_neither_signed_nor_checked() -> None:
    record = signed_deploy()
    traced = Record(record.key, record.value, (*record.headers, ("traceparent", b"00-abc-def-01")))

    assert verify_record(traced, TRUST).identity.name == "ci"


# --- what is refused --------------------------------------------------------------------------------------------


def test_an_unsigned_message_is_refused() -> None:
    assert "signature: unsigned" in refusal(encode(deploy(), "/ci/pipeline"))
    assert "signature: unsigned" in refusal(with_header(signed_deploy(), MATERIAL_HEADER, b""))


def test_a_structured_mode_message_is_refused_as_unsigned_with_a_hint() -> None:
    record = Record(key=b"physical/web-1/shop", value=b'{"specversion": "1.0"}', headers=())

    assert "use the binary mode" in refusal(record)


def test_a_message_signed_by_a_key_not_in_the_trust_file_is_refused() -> None:
    message = refusal(signed_deploy(STRANGER))

    assert "unknown key" in message
    assert STRANGER.key_id in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ce_id", b"8d0c1e7a-2222-4a5b-9c3d-000000000002"),  # a valid command replayed under a new id
        ("ce_source", b"/reactor"),
        ("ce_specversion", b"1.1"),
        ("ce_type", b"dev.deployreactor.node.rollback.requested.v1"),
        ("ce_subject", b"physical/db-1/shop"),
        ("ce_time", b"2031-01-01T00:00:00Z"),
        ("content-type", b"text/plain"),
        ("ce_dataschema", b"https://schemas.example.test/deploy.json"),  # absent when signed, added after
    ],
)
def test_every_core_attribute_is_covered(name: str, value: bytes) -> None:
    message = refusal(with_header(signed_deploy(), name, value))

    assert "tampered: the context attributes or data differ from what 'ci' signed" in message


@pytest.mark.parametrize("name", ["ce_id", "ce_subject", "ce_time", "content-type"])
def test_removing_a_core_attribute_is_refused(name: str) -> None:
    assert "tampered: the context attributes" in refusal(with_header(signed_deploy(), name, None))


@pytest.mark.parametrize("name", ["ce_correlationid", "ce_causationid", "ce_partitionkey"])
def test_every_extension_attribute_is_covered_changed_or_removed(name: str) -> None:
    changed = refusal(with_header(signed_deploy(), name, b"other-1"))
    removed = refusal(with_header(signed_deploy(), name, None))

    for message in (changed, removed):
        assert "tampered: the extension attributes causationid, correlationid, partitionkey differ" in message


def test_every_byte_of_the_data_is_covered() -> None:
    record = signed_deploy()
    for index in range(len(record.value)):
        body = bytearray(record.value)
        body[index] ^= 0x01
        assert "tampered" in refusal(Record(record.key, bytes(body), record.headers)), index
    assert "tampered" in refusal(Record(record.key, record.value + b" ", record.headers))
    assert "tampered" in refusal(Record(record.key, record.value[:-1], record.headers))


def test_time_is_covered_to_the_second_in_utc_as_the_extension_defines() -> None:
    record = signed_deploy()
    assert header(record, "ce_time") == b"2026-05-13T09:49:12.123456Z"

    # The same second written in another zone or with another fraction still verifies (the extension hashes
    # whole seconds in UTC, so re-serialising intermediaries do not break signatures); another second does not.
    for same in (b"2026-05-13T10:49:12.9+01:00", b"2026-05-13T09:49:12Z", b"2026-05-13T09:49:12.000001Z"):
        assert verify_record(with_header(record, "ce_time", same), TRUST).identity.name == "ci"
    for other in (b"2026-05-13T09:49:13Z", b"2026-05-13T09:49:12.5+01:00"):
        assert "tampered" in refusal(with_header(record, "ce_time", other))


def test_an_extension_attribute_added_after_signing_is_refused_as_not_covered() -> None:
    message = refusal(with_header(signed_deploy(), "ce_approvedby", b"mallory"))

    assert "not covered: extension attribute ce_approvedby is not signed by 'ci'" in message


def test_an_extension_attribute_the_signer_left_out_is_refused_as_not_covered() -> None:
    record = encode(deploy(), "/ci/pipeline")
    partial = record.headers + sign_headers(record.headers, record.value, CI, extensions=["partitionkey"])

    with pytest.raises(SignatureError, match=r"^signature: not covered: .*ce_causationid, ce_correlationid"):
        verify_headers(partial, record.value, TRUST)


def test_a_changed_payload_type_is_refused() -> None:
    record = signed_deploy()
    document = envelope_of(record)
    document["payloadType"] = "application/vnd.in-toto+json"

    assert "unknown payloadType 'application/vnd.in-toto+json'" in refusal(with_envelope(record, document))


def test_a_payload_type_changed_back_and_forth_cannot_be_signed_under_another_type() -> None:
    # A signature made over the same material under another payload type does not verify under ours.
    record = signed_deploy()
    document = envelope_of(record)
    material = base64.b64decode(str(document["payload"]))
    foreign = CI.sign(dsse.pae("application/vnd.in-toto+json", material))
    document["signatures"] = [{"keyid": CI.key_id, "sig": base64.b64encode(foreign).decode()}]

    assert "bad signature" in refusal(with_envelope(record, document))


def test_a_changed_key_id_is_refused() -> None:
    record = signed_deploy()
    document = envelope_of(record)
    signature = document["signatures"][0]

    signature["keyid"] = STRANGER.key_id
    assert "unknown key" in refusal(with_envelope(record, document))
    signature["keyid"] = EXECUTOR.key_id  # another trusted identity's key does not make it that identity's
    assert "bad signature: does not verify with the key of 'executor'" in refusal(with_envelope(record, document))
    signature["keyid"] = ""
    assert "unknown key: (none)" in refusal(with_envelope(record, document))


def test_a_changed_signature_is_refused() -> None:
    record = signed_deploy()
    document = envelope_of(record)
    signature = document["signatures"][0]
    raw = bytearray(base64.b64decode(signature["sig"]))
    raw[0] ^= 0x80
    signature["sig"] = base64.b64encode(bytes(raw)).decode()

    assert "bad signature: does not verify with the key of 'ci'" in refusal(with_envelope(record, document))


def test_material_recomputed_for_a_tampered_event_without_the_key_is_refused() -> None:
    """The attacker changes the version and recomputes the digests, but cannot sign them."""
    record = signed_deploy()
    body = record.value.replace(b'"version": "2.4.1"', b'"version": "6.6.6"')
    assert body != record.value
    forged = Record(record.key, body, record.headers)
    document = envelope_of(record)
    attributes = {
        name.removeprefix("ce_") if name != "content-type" else "datacontenttype": value.decode()
        for name, value in forged.headers
        if name != MATERIAL_HEADER
    }
    names = ("causationid", "correlationid", "partitionkey")
    document["payload"] = base64.b64encode(verification_material(attributes, body, names)).decode()

    assert "bad signature" in refusal(with_envelope(forged, document))


def test_a_signature_by_a_trusted_key_that_still_verifies_wins_over_bad_ones() -> None:
    record = signed_deploy()
    document = envelope_of(record)
    good = document["signatures"][0]
    document["signatures"] = [{"keyid": EXECUTOR.key_id, "sig": good["sig"]}, {"keyid": "nobody", "sig": ""}, good]

    assert verify_record(with_envelope(record, document), TRUST).identity.name == "ci"


@pytest.mark.parametrize(
    ("material", "reason"),
    [
        (b'{"core":"AAAA"}', "core is not a SHA-256 digest"),
        (b'{"ext":"' + base64.b64encode(bytes(32)) + b'","signedextattrs":[]}', "core is required"),
        (b"[]", "must be a JSON object"),
        (b"not json", "not JSON"),
        (b'{"core":"x","core":"y"}', "member 'core' appears twice"),
    ],
)
def test_malformed_verification_material_is_refused(material: bytes, reason: str) -> None:
    message = refusal(with_material(signed_deploy(), material))

    assert message.startswith(f"signature: malformed {MATERIAL_HEADER}")
    assert reason in message


@pytest.mark.parametrize(
    ("listed", "with_ext", "reason"),
    [
        (["correlationid", "correlationid"], True, "'correlationid' appears twice"),  # the extension's case 8a
        (["correlationid", "id"], True, "'id' is a core context attribute"),  # case 8b
        (["dssematerial"], True, "'dssematerial' is the signature itself"),  # case 8c
        (["correlationid"], False, "ext and signedextattrs go together"),  # case 8d
        (None, True, "ext and signedextattrs go together"),  # case 8e
        ("correlationid", True, "signedextattrs must be a list"),
        ([7], True, "7 is not an attribute name"),
    ],
)
def test_signedextattrs_breaking_the_extension_rules_is_refused_even_when_validly_signed(
    listed: object, with_ext: bool, reason: str
) -> None:
    core = base64.b64encode(bytes(32)).decode()
    material: dict[str, object] = {"core": core}
    if with_ext:
        material["ext"] = core
    if listed is not None:
        material["signedextattrs"] = listed

    message = refusal(with_material(signed_deploy(), json.dumps(material).encode()))

    assert reason in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"%%%", "not Base64"),
        (base64.b64encode(b"{}"), "payloadType: required"),
        (base64.b64encode(b'{"payloadType":"x","payload":"","signatures":[]}'), "signatures: required"),
        (base64.b64encode(b"\xff\xfe"), "not UTF-8"),
        (base64.b64encode(b"[" * 2500 + b"]" * 2500), "not JSON"),  # nesting beyond the parser's recursion
        (b"A" * 9000, "the limit is"),
    ],
)
def test_a_malformed_dssematerial_header_is_refused(value: bytes, reason: str) -> None:
    message = refusal(with_header(signed_deploy(), MATERIAL_HEADER, value))

    assert message.startswith(f"signature: malformed {MATERIAL_HEADER}")
    assert reason in message


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (("ce_id", b"another"), "ce_id appears twice"),
        ((MATERIAL_HEADER, b"AAAA"), f"{MATERIAL_HEADER} appears twice"),
        (("Ce_Id", b"another"), "'Ce_Id' is not ce_ and a lower-case attribute name"),
        (("ce_note", b"\xff"), "ce_note is not UTF-8"),
        (("ce_dataschema", b""), "ce_dataschema is empty"),  # hashes as the absent dataschema would
        (("ce_approvedby", b""), "ce_approvedby is empty"),
    ],
)
def test_headers_two_readers_could_read_differently_are_refused(extra: tuple[str, bytes], reason: str) -> None:
    record = signed_deploy()

    message = refusal(Record(record.key, record.value, (*record.headers, extra)))

    assert message.startswith("signature: malformed headers:")
    assert reason in message


def test_signature_errors_are_decode_errors_so_consumers_dead_letter_them() -> None:
    error = SignatureError("unsigned: no ce_dssematerial header")

    assert isinstance(error, DecodeError)
    assert str(error) == "signature: unsigned: no ce_dssematerial header"
    assert not error.retriable


def test_signing_refuses_a_list_of_extensions_that_breaks_the_extension_rules() -> None:
    record = encode(deploy(), "/ci/pipeline")

    with pytest.raises(ValueError, match="'time' is a core context attribute"):
        sign_headers(record.headers, record.value, CI, extensions=["time"])


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("2020-06-18T17:24:53Z", "2020-06-18T17:24:53Z"),
        ("2020-06-18T19:24:53+02:00", "2020-06-18T17:24:53Z"),
        ("2026-05-13T10:49:12.123456+01:00", "2026-05-13T09:49:12Z"),  # the extension's example
        ("2026-05-13T09:49:12.999Z", "2026-05-13T09:49:12Z"),
        ("2020-06-18T17:24:53.123456789z", "2020-06-18T17:24:53Z"),
        ("2020-06-18t17:24:53", "2020-06-18T17:24:53Z"),  # no zone: UTC
        ("2020-12-31T23:30:00-01:00", "2021-01-01T00:30:00Z"),
    ],
)
def test_time_is_normalized_to_utc_whole_seconds(value: str, normalized: str) -> None:
    assert normalize_time(value) == normalized


@pytest.mark.parametrize(
    "value", ["2020-13-01T00:00:00Z", "2020-06-18 17:24:53Z", "yesterday", "2020-06-18T17:24:53+99:00"]
)
def test_a_time_that_is_not_rfc3339_is_refused(value: str) -> None:
    with pytest.raises(SignatureError, match=r"^signature: time: "):
        normalize_time(value)


# --- keys -----------------------------------------------------------------------------------------------------


def test_generate_key_writes_a_private_key_only_its_owner_can_read_and_a_public_key(tmp_path: Path) -> None:
    directory = tmp_path / "keys"

    generated = generate_key("ci", directory)

    private, public = directory / "ci.key", directory / "ci.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = load_signing_key(private)
    assert key.key_id == generated
    loaded_public = serialization.load_pem_public_key(public.read_bytes())
    assert isinstance(loaded_public, Ed25519PublicKey)
    assert key_id(loaded_public) == generated
    assert len(generated) == 64
    assert generated == hashlib.sha256(bytes.fromhex(_raw_public_hex(key))).hexdigest()


def _raw_public_hex(key: SigningKey) -> str:
    return key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def test_generate_key_never_overwrites_a_key(tmp_path: Path) -> None:
    first = generate_key("ci", tmp_path)

    with pytest.raises(InvalidInput, match="already exists"):
        generate_key("ci", tmp_path)
    assert load_signing_key(tmp_path / "ci.key").key_id == first


@pytest.mark.parametrize("name", ["../ci", ".hidden", "a/b", "", "x" * 200])
def test_generate_key_refuses_a_name_that_is_not_a_plain_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput, match=r"^name: "):
        generate_key(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_a_signing_key_file_accessible_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    generate_key("ci", tmp_path)
    path = tmp_path / "ci.key"
    path.chmod(mode)

    with pytest.raises(InvalidInput) as caught:
        load_signing_key(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: the signing key is accessible by group or others (mode {mode:04o})")
    assert "chmod 600" in message
    assert "PRIVATE KEY" not in message


def test_an_owner_read_only_key_file_is_accepted(tmp_path: Path) -> None:
    generated = generate_key("ci", tmp_path)
    (tmp_path / "ci.key").chmod(0o400)

    assert load_signing_key(tmp_path / "ci.key").key_id == generated


def test_a_symlinked_missing_or_wrong_key_file_is_refused(tmp_path: Path) -> None:
    generate_key("ci", tmp_path)
    (tmp_path / "link.key").symlink_to(tmp_path / "ci.key")
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for name, content in (("ec.key", ec_key), ("junk.key", b"not a key")):
        path = tmp_path / name
        path.write_bytes(content)
        path.chmod(0o600)

    with pytest.raises(InvalidInput, match="cannot read the signing key"):
        load_signing_key(tmp_path / "link.key")
    with pytest.raises(InvalidInput, match="cannot read the signing key"):
        load_signing_key(tmp_path / "missing.key")
    with pytest.raises(InvalidInput, match="not an Ed25519 private key"):
        load_signing_key(tmp_path / "ec.key")
    with pytest.raises(InvalidInput, match="not an unencrypted PKCS#8 PEM private key"):
        load_signing_key(tmp_path / "junk.key")


def test_a_signing_key_shows_only_its_key_id() -> None:
    assert repr(CI) == f"SigningKey(key_id={CI.key_id!r})"


# --- the trust file -------------------------------------------------------------------------------------------


def _trust_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trust.yaml"
    path.write_text(text)
    return path


def _indented_pem(key: SigningKey) -> str:
    return "".join(f"      {line}\n" for line in public_key_pem(key.public_key).splitlines())


def test_a_trust_file_names_identities_by_key_file_or_inline_pem(tmp_path: Path) -> None:
    ci_id = generate_key("ci", tmp_path / "keys")
    path = _trust_file(
        tmp_path,
        "- name: ci\n"
        "  public_key: keys/ci.pub\n"
        "- name: reactor-executor\n"
        "  reactor: true\n"
        "  public_key: |\n" + _indented_pem(EXECUTOR),
    )

    trust = load_trust_file(path)

    assert [identity.name for identity in trust] == ["ci", "reactor-executor"]
    ci = trust.by_key_id(ci_id)
    assert ci is not None
    assert ci.name == "ci"
    assert not ci.reactor
    executor = trust.by_name("reactor-executor")
    assert executor is not None
    assert executor.reactor
    assert executor.key_id == EXECUTOR.key_id
    assert trust.by_key_id(STRANGER.key_id) is None
    assert len(trust) == 2
    record = sign_record(encode(deploy(), "/ci"), load_signing_key(tmp_path / "keys" / "ci.key"))
    assert verify_record(record, trust).identity.name == "ci"


@pytest.mark.parametrize(
    ("text", "field", "rule"),
    [
        ("- public_key: keys/ci.pub\n", "identities.0.name", "Field required"),
        ("- name: ci\n", "identities.0.public_key", "Field required"),
        ("- {name: 'bad name', public_key: keys/ci.pub}\n", "identities.0.name", "String should match pattern"),
        ("- {name: ci, public_key: keys/ci.pub, reactor: 'true'}\n", "identities.0.reactor", "valid boolean"),
        ("- {name: ci, public_key: keys/ci.pub, reacter: true}\n", "identities.0.reacter", "Extra inputs"),
        ("- {name: ci, public_key: keys/missing.pub}\n", "identities.0.public_key", "cannot read keys/missing.pub"),
        ("- {name: ci, public_key: keys/ci.key}\n", "identities.0.public_key (keys/ci.key)", "not a PEM public key"),
        ("- {name: ci, public_key: '-----BEGIN PUBLIC KEY-----'}\n", "identities.0.public_key", "not a PEM public key"),
        (
            "- {name: ci, public_key: keys/ci.pub}\n- {name: ci, public_key: keys/other.pub}\n",
            "identities.1.name",
            "'ci' is already identity 0",
        ),
        (
            "- {name: ci, public_key: keys/ci.pub}\n- {name: ci2, public_key: keys/ci.pub}\n",
            "identities.1.public_key",
            "the same key as identity 'ci'",
        ),
        ("- ci\n", "identities.0", "must be a mapping"),
        ("identities: []\n", "identities", "non-empty list"),
        ("[]\n", "identities", "non-empty list"),
        ("- {name: ci, public_key: 7}\n", "identities.0.public_key", "valid string"),
    ],
)
def test_trust_file_errors_name_the_field(tmp_path: Path, text: str, field: str, rule: str) -> None:
    generate_key("ci", tmp_path / "keys")
    generate_key("other", tmp_path / "keys")

    with pytest.raises(InvalidInput) as caught:
        load_trust_file(_trust_file(tmp_path, text))

    assert caught.value.field == field
    assert rule in caught.value.rule


def test_a_trust_file_with_a_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pub").write_bytes(pem)

    with pytest.raises(InvalidInput, match=r"^identities\.0\.public_key \(ec\.pub\): not an Ed25519 public key"):
        load_trust_file(_trust_file(tmp_path, "- {name: ci, public_key: ec.pub}\n"))


def test_an_unreadable_or_broken_trust_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        load_trust_file(tmp_path / "missing.yaml")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_trust_file(_trust_file(tmp_path, "- {name: ci\n"))


def test_a_trust_store_refuses_two_identities_with_one_key() -> None:
    with pytest.raises(ValueError, match="same public key"):
        TrustStore([Identity.of("a", CI.public_key), Identity.of("b", CI.public_key)])


# --- interoperability: an independent DSSE implementation ----------------------------------------------------


def test_our_envelope_verifies_with_securesystemslib() -> None:
    record = signed_deploy()
    document = envelope_of(record)
    key = SSlibKey.from_crypto(CI.public_key, keyid=CI.key_id)

    envelope = SslibEnvelope.from_dict(document)
    accepted = envelope.verify([key], 1)

    assert list(accepted) == [CI.key_id]
    assert envelope.payload_type == PAYLOAD_TYPE
    assert json.loads(envelope.payload)["signedextattrs"] == ["causationid", "correlationid", "partitionkey"]
    tampered = SslibEnvelope.from_dict(envelope_of(record))
    tampered.payload = tampered.payload.replace(b'"core":"', b'"core":"A')
    with pytest.raises(VerificationError):
        tampered.verify([key], 1)


def test_an_envelope_signed_by_securesystemslib_verifies_here() -> None:
    record = encode(deploy(), "/ci/pipeline")
    private_key = Ed25519PrivateKey.generate()
    signer = CryptoSigner(
        private_key, SSlibKey.from_crypto(private_key.public_key(), keyid=key_id(private_key.public_key()))
    )
    ours = envelope_of(sign_record(record, CI))
    envelope = SslibEnvelope(base64.b64decode(str(ours["payload"])), PAYLOAD_TYPE, {})
    envelope.sign(signer)
    encoded = base64.b64encode(json.dumps(envelope.to_dict()).encode())
    trust = TrustStore([Identity.of("other-ci", private_key.public_key())])

    verified = verify_headers((*record.headers, (MATERIAL_HEADER, encoded)), record.value, trust)

    assert verified.identity.name == "other-ci"


# --- the extension's own test vectors (ECDSA P-256 key, raw r||s signatures) -----------------------------------

# From the extension's "Test Vectors" section: its key and the `dssematerial` of cases 3, 4, 5 and 7.
SPEC_KEY_X = 46950820868899156662930047687818585632848591499744589407958293238635476079160
SPEC_KEY_Y = 5640078356564379163099075877009565129882514886557779369047442380624545832820
SPEC_CASE_3_AND_4 = (
    "eyJwYXlsb2FkVHlwZSI6Imh0dHBzOi8vY2xvdWRldmVudHMuaW8vdmVyaWZpYWJpbGl0eS9kc3NlL3YwLjEiLCJwYXlsb2FkIjoiZXlKamIzSmxJ"
    "am9pZDB0RFlUaHpjVE5rZVdjdk1EQmFhVVJSZVM5aFdFRlpNWFJsY0ZGdWNrdE1ZVFo0VURCWk0wUXZVVDBpZlE9PSIsInNpZ25hdHVyZXMiOlt7"
    "ImtleWlkIjoidGVzdGtleSIsInNpZyI6IlVNcWlOWXA3U1FacTZNSGRtczRkbjJtc0hHaW5MSHZaYVVWM2doY2ovY241QmkzZDVqejBzZmhtOXBa"
    "ODlDY09hK1dXdGpZNmNadmo3Yy90T1dzVFZnPT0ifV19"
)
SPEC_CASE_5 = (
    "eyJwYXlsb2FkVHlwZSI6Imh0dHBzOi8vY2xvdWRldmVudHMuaW8vdmVyaWZpYWJpbGl0eS9kc3NlL3YwLjEiLCJwYXlsb2FkIjoiZXlKamIzSmxJ"
    "am9pY1VOVFpXbGFhMU1yYUVnNVYybERiR1p4Tm5Cc1puRlpUbFo1TW10MmVGZFNabTlDY2t4RmVtOUVhejBpZlE9PSIsInNpZ25hdHVyZXMiOlt7"
    "ImtleWlkIjoidGVzdGtleSIsInNpZyI6IkYyaXAweG1nSlgzdWdIWkM2dE1ycjdBMkVxYWkwOHJhR3JUd2R5aC9PR0RJSXJGN0J5TTJ5SVRMS3FO"
    "ckYzZHpaR1IybzBDczlmRUJGZEx4Uk9VeUVRPT0ifV19"
)
SPEC_CASE_7 = (
    "eyJwYXlsb2FkVHlwZSI6Imh0dHBzOi8vY2xvdWRldmVudHMuaW8vdmVyaWZpYWJpbGl0eS9kc3NlL3YwLjEiLCJwYXlsb2FkIjoiZXlKamIzSmxJ"
    "am9pVEZSblVVdElSMmhsWnpaVU5EaDRjRWRIY2pWNlRtdGthSEF5TW10bGJscERUM0ZwWTBaMFNUUlRRVDBpTENKbGVIUWlPaUpJUWpGd1pUUXpN"
    "VVp2VVZwU2MwcGllVXhPVFhFd1VXRkJkbkZRZEcxb1pHazRaRWhIVTJoaVNrRlZQU0lzSW5OcFoyNWxaR1Y0ZEdGMGRISnpJanBiSW1WNGRHRWlM"
    "Q0psZUhSaUlsMTkiLCJzaWduYXR1cmVzIjpbeyJrZXlpZCI6InRlc3RrZXkiLCJzaWciOiIyZzFVb0FRcHoxb1BqWlRQUlplK3l2THpaUU5FQ1pha2"
    "piWlZYaXpEd2RNbmVJSCsrLzUzdVhOMmJDU2tWSkltZndPaVl5S0JtNG12c01ISlhJVWh6Zz09In1dfQ=="
)


def _spec_envelope(encoded: str) -> dsse.Envelope:
    envelope = dsse.Envelope.from_json(dsse.b64decode(encoded))
    assert envelope.payload_type == PAYLOAD_TYPE
    return envelope


def _spec_signature_verifies(envelope: dsse.Envelope, payload: bytes) -> None:
    """The extension's P-256 signature of `envelope` verifies over our PAE of `payload`."""
    public_key = ec.EllipticCurvePublicNumbers(SPEC_KEY_X, SPEC_KEY_Y, ec.SECP256R1()).public_key()
    raw = envelope.signatures[0].sig
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key.verify(der, dsse.pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))


def test_the_extensions_binary_data_vector_is_reproduced_byte_for_byte() -> None:
    """Case 5: binary data, no time; our material is the vector's payload and its signature is over our PAE."""
    attributes = {
        "specversion": "1.0",
        "id": "1",
        "source": "example/uri",
        "type": "example.type.binary",
        "datacontenttype": "application/octet-stream",
    }
    envelope = _spec_envelope(SPEC_CASE_5)

    material = verification_material(attributes, base64.b64decode("8J+koQ=="), ())

    assert material == envelope.payload
    _spec_signature_verifies(envelope, material)


def test_the_extensions_time_vectors_normalise_to_one_material_and_verify() -> None:
    """Cases 3 and 4: one instant in two zones gives one material (theirs are equal, and so are our digests)."""
    envelope = _spec_envelope(SPEC_CASE_3_AND_4)
    base = {"specversion": "1.0", "id": "1", "source": "example/uri", "type": "example.type", "subject": ""}
    zulu = core_digest({**base, "time": "2020-06-18T17:24:53Z"}, b'{"hello":"world"}')
    offset = core_digest({**base, "time": "2020-06-18T19:24:53+02:00"}, b'{"hello":"world"}')

    assert zulu == offset
    assert set(json.loads(envelope.payload)) == {"core"}
    _spec_signature_verifies(envelope, envelope.payload)


def test_the_extensions_extension_attribute_vector_gives_the_same_ext_digest() -> None:
    """Case 7: exta=value1, extb=value2, both signed, in that order."""
    envelope = _spec_envelope(SPEC_CASE_7)
    material = json.loads(envelope.payload)

    assert material["signedextattrs"] == ["exta", "extb"]
    ext = extensions_digest({"exta": "value1", "extb": "value2"}, ("exta", "extb"))
    assert base64.b64encode(ext).decode() == material["ext"]
    assert extensions_digest({"exta": "value1", "extb": "value2"}, ("extb", "exta")) != ext
    _spec_signature_verifies(envelope, envelope.payload)


# --- a hand-computed vector -----------------------------------------------------------------------------------

# Ed25519 key from the seed 00 01 02 ... 1f. The signature below was computed once with `cryptography` and
# confirmed with libsodium (PyNaCl's SigningKey(seed).sign), which agreed byte for byte, as did the key id.
SEED = bytes(range(32))
SEED_KEY_ID = "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
SEED_SIGNATURE = (
    "2b6bd57fc91eef514d3fc6b129d165860e3c3754498ad89a69ddd068307bf554"
    "57b46f9cbc1ca8ac90b1ef19fc24d09ffadb3107ec499f04bc845a0c5947fd02"
)
FIXED_HEADERS: Headers = (
    ("ce_specversion", b"1.0"),
    ("ce_id", b"1"),
    ("ce_source", b"/ci/test"),
    ("ce_type", b"example.type"),
    ("ce_time", b"2020-06-18T19:24:53.5+02:00"),
    ("content-type", b"application/json"),
    ("ce_correlationid", b"r1"),
)
FIXED_BODY = b'{"hello":"world"}'


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_pae_is_dssev1_lengths_and_bytes() -> None:
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"  # the DSSE protocol's own example
    )
    assert dsse.pae("", b"") == b"DSSEv1 0  0 "
    assert dsse.pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"  # lengths count bytes, not characters


def test_a_hand_computed_vector() -> None:
    key = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(SEED))
    # CORE_DIGEST by hand: id, source, specversion, type, datacontenttype, dataschema (absent), subject (absent),
    # time in UTC to the second, data.
    core = sha256(
        sha256(b"1")
        + sha256(b"/ci/test")
        + sha256(b"1.0")
        + sha256(b"example.type")
        + sha256(b"application/json")
        + sha256(b"")
        + sha256(b"")
        + sha256(b"2020-06-18T17:24:53Z")
        + sha256(FIXED_BODY)
    )
    ext = sha256(sha256(b"r1"))
    material = (
        b'{"core":"'
        + base64.b64encode(core)
        + b'","ext":"'
        + base64.b64encode(ext)
        + b'","signedextattrs":["correlationid"]}'
    )
    assert len(material) == 143
    expected_pae = b"DSSEv1 46 https://cloudevents.io/verifiability/dsse/v0.1 143 " + material

    (name, value), *rest = sign_headers(FIXED_HEADERS, FIXED_BODY, key)

    assert (name, rest) == (MATERIAL_HEADER, [])
    assert key.key_id == SEED_KEY_ID == hashlib.sha256(bytes.fromhex(_raw_public_hex(key))).hexdigest()
    envelope = json.loads(base64.b64decode(value))
    assert list(envelope) == ["payloadType", "payload", "signatures"]
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(envelope["payload"]) == material
    assert dsse.pae(PAYLOAD_TYPE, material) == expected_pae
    assert envelope["signatures"] == [
        {"keyid": SEED_KEY_ID, "sig": base64.b64encode(bytes.fromhex(SEED_SIGNATURE)).decode()}
    ]
    trust = TrustStore([Identity.of("seed", key.public_key)])
    assert verify_headers((*FIXED_HEADERS, (name, value)), FIXED_BODY, trust).identity.name == "seed"


def test_ed25519_matches_rfc8032_test_1() -> None:
    """The raw signature primitive against RFC 8032, section 7.1, TEST 1 (empty message)."""
    private_key = Ed25519PrivateKey.from_private_bytes(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    assert public.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert private_key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24"
        "655141438e7a100b"
    )


def test_a_generated_key_file_signs_what_its_public_key_file_verifies(tmp_path: Path) -> None:
    generate_key("executor", tmp_path)
    key = load_signing_key(tmp_path / "executor.key")
    public = serialization.load_pem_public_key((tmp_path / "executor.pub").read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    trust = TrustStore([Identity.of("executor", public, reactor=True)])

    assert verify_record(signed_deploy(key), trust).identity.reactor
