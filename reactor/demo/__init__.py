"""The example service and its packages, used by `reactor demo`, examples/ and the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

SERVICE = "hello"
SOURCE = Path(__file__).parent / "hello"


@dataclass(frozen=True, slots=True)
class BuiltPackage:
    """A package file, its version and its SHA256."""

    version: str
    path: Path
    sha256: str

    @property
    def url(self) -> str:
        """A file:// URL of the package."""
        return self.path.resolve().as_uri()


BROKEN_RUN = b"#!/bin/sh\necho 'refusing to start' >&2\nexit 3\n"


def build_package(out_dir: Path, version: str, *, broken: bool = False, run: bytes | None = None) -> BuiltPackage:
    """Build `hello-<version>.tar.gz` byte-for-byte reproducibly.

    `broken` makes a service that exits at once; `run` replaces the package's start script (a service that
    never answers, say).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    start = run if run is not None else BROKEN_RUN if broken else (SOURCE / "run").read_bytes()
    files: dict[str, tuple[bytes, int]] = {
        "VERSION": (f"{version}\n".encode(), 0o644),
        "app.py": ((SOURCE / "app.py").read_bytes(), 0o644),
        "run": (start, 0o755),
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            data, mode = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    path = out_dir / f"{SERVICE}-{version}.tar.gz"
    with path.open("wb") as target, gzip.GzipFile(fileobj=target, mode="wb", mtime=0, filename="") as zipped:
        zipped.write(raw.getvalue())
    return BuiltPackage(version=version, path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
