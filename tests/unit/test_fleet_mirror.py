"""The test-host builder takes its Debian mirror from this machine's apt sources, as apt itself reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra.fleet import DEFAULT_MIRROR, _mirror

pytestmark = pytest.mark.unit

DEB822 = """Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm

Types: deb
# a comment inside the block
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_deb822_sources_give_the_first_binary_non_security_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REACTOR_FLEET_MIRROR", raising=False)
    apt = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822})
    assert _mirror(apt) == "http://mirror.example.org/debian"


def test_one_line_sources_with_options_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REACTOR_FLEET_MIRROR", raising=False)
    listing = (
        "# deb http://commented.example.org/debian bookworm main\n"
        "deb http://security.example.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://mirror.example.net/pub/debian bookworm main\n"
    )
    assert _mirror(apt_dir(tmp_path, {"sources.list": listing})) == "https://mirror.example.net/pub/debian"


def test_files_apt_does_not_read_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REACTOR_FLEET_MIRROR", raising=False)
    apt = apt_dir(
        tmp_path,
        {
            "sources.list.d/a.list.disabled-by-admin": "deb http://disabled.example.org/debian bookworm main\n",
            "sources.list.d/b.list": "deb http://used.example.org/debian bookworm main\n",
        },
    )
    assert _mirror(apt) == "http://used.example.org/debian"


def test_the_environment_wins_and_nothing_configured_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REACTOR_FLEET_MIRROR", raising=False)
    assert _mirror(apt_dir(tmp_path, {})) == DEFAULT_MIRROR
    monkeypatch.setenv("REACTOR_FLEET_MIRROR", "http://local.example/debian")
    assert _mirror(tmp_path) == "http://local.example/debian"
