"""Trust: Ed25519 keys, the identities that hold them, and signed events (Verifiable CloudEvents with DSSE)."""

from reactor.trust.identities import Identity, TrustStore, load_trust_file
from reactor.trust.keys import SigningKey, generate_key, key_id, load_signing_key
from reactor.trust.signing import (
    SignatureError,
    Verified,
    is_signed,
    sign_headers,
    sign_record,
    verify_headers,
    verify_record,
)

__all__ = [
    "Identity",
    "SignatureError",
    "SigningKey",
    "TrustStore",
    "Verified",
    "generate_key",
    "is_signed",
    "key_id",
    "load_signing_key",
    "load_trust_file",
    "sign_headers",
    "sign_record",
    "verify_headers",
    "verify_record",
]
