"""Identities: who holds which public key, and whether it is a reactor identity; read from the trust file.

The trust file (`REACTOR_TRUST_FILE`) is YAML, a list of identities:

    - name: ci                       # shown in the audit trail and used by the policy
      public_key: keys/ci.pub        # a file relative to the trust file, or the PEM itself
    - name: reactor-executor
      public_key: |
        -----BEGIN PUBLIC KEY-----
        MCowBQYDK2VwAyEA...
        -----END PUBLIC KEY-----
      reactor: true                  # a worker or pacer: may sign the commands it derives (default false)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from reactor.errors import InvalidInput
from reactor.events import ACTOR
from reactor.trust.keys import key_id, public_key_from_pem

_PEM_BEGIN = "-----BEGIN"
_MAX_PUBLIC_KEY_FILE = 64 * 1024
# The name of the list in error locations ("identities.2.public_key"), as a release file names "nodes.0.port".
_ROOT = "identities"


@dataclass(frozen=True, slots=True)
class Identity:
    """A named holder of one public key; `reactor`: a worker or pacer, trusted to sign what it derives."""

    name: str
    key_id: str
    public_key: Ed25519PublicKey
    reactor: bool = False

    @classmethod
    def of(cls, name: str, public_key: Ed25519PublicKey, *, reactor: bool = False) -> Identity:
        """An identity for `public_key`, its key id computed."""
        return cls(name, key_id(public_key), public_key, reactor)


class TrustStore:
    """The identities a process trusts, by key id (what a signature names) or by name (what a policy names)."""

    def __init__(self, identities: Iterable[Identity]) -> None:
        self._by_key_id: dict[str, Identity] = {}
        self._by_name: dict[str, Identity] = {}
        for identity in identities:
            if identity.name in self._by_name:
                raise ValueError(f"identity {identity.name!r} appears twice")
            if identity.key_id in self._by_key_id:
                other = self._by_key_id[identity.key_id].name
                raise ValueError(f"identities {other!r} and {identity.name!r} have the same public key")
            self._by_key_id[identity.key_id] = identity
            self._by_name[identity.name] = identity

    def by_key_id(self, key_id: str) -> Identity | None:
        """The identity holding the key with this id, if trusted."""
        return self._by_key_id.get(key_id)

    def by_name(self, name: str) -> Identity | None:
        """The identity called `name`, if trusted."""
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Identity]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


class _Entry(BaseModel):
    """One identity as the trust file states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[StrictStr, Field(pattern=ACTOR)]
    public_key: Annotated[StrictStr, Field(min_length=1)]
    reactor: StrictBool = False


def load_trust_file(path: Path) -> TrustStore:
    """Read and validate a trust file; errors name the field (`identities.2.public_key: ...`)."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidInput(str(path), f"cannot read: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInput(str(path), f"not valid YAML: {exc}") from exc
    if not isinstance(document, list) or not document:
        raise InvalidInput(_ROOT, "the trust file must be a non-empty list of identities (name, public_key, reactor)")
    base = path.parent
    identities: list[Identity] = []
    seen_names: dict[str, int] = {}
    seen_keys: dict[str, str] = {}
    for index, item in enumerate(document):
        entry = _entry(index, item)
        where = f"{_ROOT}.{index}"
        public_key = _public_key(entry.public_key, base, f"{where}.public_key")
        identity = Identity.of(entry.name, public_key, reactor=entry.reactor)
        if entry.name in seen_names:
            raise InvalidInput(f"{where}.name", f"{entry.name!r} is already identity {seen_names[entry.name]}")
        if identity.key_id in seen_keys:
            raise InvalidInput(
                f"{where}.public_key", f"the same key as identity {seen_keys[identity.key_id]!r}; one key, one identity"
            )
        seen_names[entry.name] = index
        seen_keys[identity.key_id] = entry.name
        identities.append(identity)
    return TrustStore(identities)


def _entry(index: int, item: Any) -> _Entry:
    where = f"{_ROOT}.{index}"
    if not isinstance(item, dict):
        raise InvalidInput(where, "must be a mapping with name, public_key and reactor")
    try:
        return _Entry.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join([where, *(str(part) for part in first["loc"])])
        raise InvalidInput(field, first["msg"]) from exc


def _public_key(value: str, base: Path, where: str) -> Ed25519PublicKey:
    """Inline PEM, or a file relative to the trust file's folder."""
    if value.lstrip().startswith(_PEM_BEGIN):
        return public_key_from_pem(value.encode(), where)
    file = base / value
    try:
        with file.open("rb") as handle:
            pem = handle.read(_MAX_PUBLIC_KEY_FILE + 1)
    except OSError as exc:
        raise InvalidInput(where, f"cannot read {value}: {exc.strerror}") from exc
    if len(pem) > _MAX_PUBLIC_KEY_FILE:
        raise InvalidInput(where, f"{value} is too large for a public key")
    return public_key_from_pem(pem, f"{where} ({value})")
