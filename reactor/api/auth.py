"""Bearer tokens mapped to identities: a YAML file of token SHA-256 digests, never the tokens themselves.

```yaml
tokens:
  <sha256 of the token, hex>: {identity: ci, signing_key: keys/ci.key}
  <sha256 of another token>: {identity: viewer, read_only: true}
```

`signing_key` (a file relative to the tokens file, mode 0600, as `reactor keys generate` writes it): every command
the API publishes for that token is signed with it, so it reaches the workers as that identity's, exactly as if it
had published it itself. With signatures required, a token that may write needs one, and its public key must be
the trust file's key of the same identity (`check_signing`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import Field, StrictBool, ValidationError

from reactor.codec import describe_validation_error
from reactor.errors import InvalidInput
from reactor.events import ACTOR, SHA256, Model
from reactor.trust.identities import TrustStore
from reactor.trust.keys import SigningKey, load_signing_key

_BEARER = re.compile(r"^Bearer ([\x21-\x7e]{1,512})$")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request acts as: the name that goes into the audit trail, and whether it may only read."""

    name: str
    read_only: bool
    # What the API signs this identity's commands with (None: the server's own key, if it has one).
    key: SigningKey | None = None


# Who a request acts as when no tokens are configured (embedded mode only, on a machine's own user).
LOCAL = Identity(name="local", read_only=False)


class _Grant(Model):
    identity: str = Field(pattern=ACTOR)
    read_only: StrictBool = False
    signing_key: str | None = Field(default=None, min_length=1)


class _TokensFile(Model):
    tokens: dict[str, _Grant]


class Tokens:
    """The configured tokens; `identify` finds a token's identity in time independent of which one matches."""

    def __init__(self, grants: dict[str, Identity]) -> None:
        self._grants = [(bytes.fromhex(digest), identity) for digest, identity in sorted(grants.items())]

    def __len__(self) -> int:
        return len(self._grants)

    def identities(self) -> list[Identity]:
        """Every identity a token grants, in the order of their digests."""
        return [identity for _, identity in self._grants]

    def check_signing(self, trust: TrustStore | None, *, required: bool) -> None:
        """Refuse (InvalidInput) tokens whose commands would not verify as their identity's.

        With `required`, a token that may write must have a signing key. A key given must be the trust file's key of
        the token's identity (when there is a trust file), and not a reactor identity's: a token acts for a person
        or a CI system, never for a worker.
        """
        for identity in self.identities():
            if identity.key is None:
                if required and not identity.read_only:
                    raise InvalidInput(
                        "api_tokens",
                        f"identity {identity.name!r} may write, and signatures are required: give its token a"
                        " signing_key, so the commands it sends are signed as that identity",
                    )
                continue
            if trust is None:
                continue
            holder = trust.by_key_id(identity.key.key_id)
            if holder is None or holder.name != identity.name:
                found = "is not in the trust file" if holder is None else f"is identity {holder.name!r}'s"
                raise InvalidInput(
                    "api_tokens",
                    f"identity {identity.name!r}: its signing_key (key {identity.key.key_id}) {found}; it must be"
                    f" the public key the trust file gives {identity.name!r}",
                )
            if holder.reactor:
                raise InvalidInput(
                    "api_tokens",
                    f"identity {identity.name!r}: a token's signing_key must not be a reactor identity's key",
                )

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity of an `Authorization: Bearer <token>` header, or None for a missing or unknown token."""
        if authorization is None:
            return None
        match = _BEARER.match(authorization)
        if match is None:
            return None
        digest = hashlib.sha256(match.group(1).encode()).digest()
        found = None
        # Every digest is compared, in constant time each, so the time taken says nothing about which one matched.
        for known, identity in self._grants:
            if hmac.compare_digest(digest, known):
                found = identity
        return found


def digest(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> Tokens:
    """Read a tokens file; InvalidInput naming the field and the rule if it is malformed."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput("api_tokens", f"cannot read {path}: {exc}") from exc
    tokens = document.get("tokens") if isinstance(document, dict) else None
    # Keys first, and never quoted: a key that is not a digest may be a token written in the clear.
    for key in tokens if isinstance(tokens, dict) else ():
        if not (isinstance(key, str) and re.fullmatch(SHA256[1:-1], key)):
            raise InvalidInput("api_tokens", f"{path}: tokens: keys are the hex SHA-256 of a token (64 of 0-9a-f)")
    try:
        parsed = _TokensFile.model_validate(document)
    except ValidationError as exc:
        raise InvalidInput("api_tokens", f"{path}: {describe_validation_error(exc)}") from exc
    keys: dict[str, SigningKey] = {}
    grants = {}
    for key, grant in parsed.tokens.items():
        signing_key = None
        if grant.signing_key is not None:
            # One file may serve several tokens of one identity; each is read (and its mode checked) once.
            if grant.signing_key not in keys:
                try:
                    keys[grant.signing_key] = load_signing_key(path.parent / grant.signing_key)
                except InvalidInput as exc:
                    raise InvalidInput(
                        "api_tokens", f"{path}: identity {grant.identity!r}: signing_key: {exc}"
                    ) from exc
            signing_key = keys[grant.signing_key]
        grants[key] = Identity(name=grant.identity, read_only=grant.read_only, key=signing_key)
    return Tokens(grants)
