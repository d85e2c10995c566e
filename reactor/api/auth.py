"""Bearer tokens mapped to identities: a YAML file of token SHA-256 digests, never the tokens themselves.

```yaml
tokens:
  <sha256 of the token, hex>: {identity: ci, read_only: false}
```
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

_BEARER = re.compile(r"^Bearer ([\x21-\x7e]{1,512})$")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request acts as: the name that goes into the audit trail, and whether it may only read."""

    name: str
    read_only: bool


# Who a request acts as when no tokens are configured (embedded mode only, on a machine's own user).
LOCAL = Identity(name="local", read_only=False)


class _Grant(Model):
    identity: str = Field(pattern=ACTOR)
    read_only: StrictBool = False


class _TokensFile(Model):
    tokens: dict[str, _Grant]


class Tokens:
    """The configured tokens; `identify` finds a token's identity in time independent of which one matches."""

    def __init__(self, grants: dict[str, Identity]) -> None:
        self._grants = [(bytes.fromhex(digest), identity) for digest, identity in sorted(grants.items())]

    def __len__(self) -> int:
        return len(self._grants)

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
    grants = {key: Identity(name=grant.identity, read_only=grant.read_only) for key, grant in parsed.tokens.items()}
    return Tokens(grants)
