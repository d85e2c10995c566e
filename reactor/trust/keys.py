"""Ed25519 signing keys on disk: generate, load (refusing files others can read), and name them by key id.

A key id is the lower-case hex SHA-256 of the raw 32-byte Ed25519 public key: it depends on the key alone, so
anyone holding a public key computes the same id, whatever file or trust entry it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from reactor.errors import InvalidInput

# A key's name becomes a file name: no path separators, no leading dot.
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
KEY_ID = r"^[0-9a-f]{64}$"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
# A private key file must not be readable or writable by anyone but its owner (as OpenSSH requires).
_OTHERS = stat.S_IRWXG | stat.S_IRWXO
_MAX_KEY_FILE = 64 * 1024


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id: hex SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo), as written to NAME.pub and accepted in a trust file."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_key_from_pem(pem: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; raises InvalidInput naming `where` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(where, "not a PEM public key (-----BEGIN PUBLIC KEY-----)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(where, f"not an Ed25519 public key ({type(key).__name__.removeprefix('_')})")
    return key


@dataclass(frozen=True, slots=True, repr=False)
class SigningKey:
    """This process's private key and its key id; its repr shows the key id only."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        """Wrap a private key, computing its key id."""
        return cls(private_key, key_id(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The matching public key."""
        return self.private_key.public_key()

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self.private_key.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


def generate_key(name: str, directory: Path) -> str:
    """Write a new key pair to DIR/NAME.key (PKCS#8 PEM, mode 0600) and DIR/NAME.pub; return its key id.

    Refuses to overwrite either file. The directory is created (mode 0700) if missing.
    """
    if re.fullmatch(KEY_NAME, name) is None:
        raise InvalidInput("name", f"{name!r} does not match {KEY_NAME}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InvalidInput(str(path), "already exists; refusing to overwrite a key")
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(private_path, pem, 0o600)
    try:
        _write_new(public_path, public_key_pem(private_key.public_key()).encode(), 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return key_id(private_key.public_key())


def private_file_problem(path: Path, what: str) -> str | None:
    """Why the private key file `path` must not be used (missing, not a file, group/world accessible), or None.

    Follows symlinks (a Kubernetes secret mount is one) and checks the file they lead to, as OpenSSH does.
    """
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot read the {what}: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"the {what} is not a regular file"
    if info.st_mode & _OTHERS:
        mode = stat.S_IMODE(info.st_mode)
        return f"the {what} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
    return None


def check_private_file(path: Path, what: str) -> None:
    """Raise InvalidInput naming `path` unless it is a regular file only its owner can access."""
    problem = private_file_problem(path, what)
    if problem is not None:
        raise InvalidInput(str(path), problem)


def load_signing_key(path: Path) -> SigningKey:
    """This process's signing key from a PKCS#8 PEM file only its owner can access (mode 0600 or 0400)."""
    where = str(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(where, f"cannot read the signing key: {exc.strerror}") from exc
    with os.fdopen(descriptor, "rb") as handle:
        # Checked on the open file itself, so the file read is the file checked.
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(where, "the signing key is not a regular file")
        if info.st_mode & _OTHERS:
            raise InvalidInput(
                where,
                f"the signing key is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
                f" run: chmod 600 {path}",
            )
        pem = handle.read(_MAX_KEY_FILE + 1)
    if len(pem) > _MAX_KEY_FILE:
        raise InvalidInput(where, "too large for a signing key")
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The library's message may quote the file; ours names only the expected form.
        raise InvalidInput(where, "not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise InvalidInput(where, f"not an Ed25519 private key ({type(private_key).__name__.removeprefix('_')})")
    return SigningKey.from_private_key(private_key)


def _write_new(path: Path, content: bytes, mode: int) -> None:
    """Create `path` with `mode` (never an existing file or a symlink) and write `content`."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # whatever the umask
            handle.write(content)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
