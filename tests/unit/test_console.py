"""The console's routes through an ASGI client: the page shell, its assets, and `whoami` for each kind of token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from reactor.adapters.embedded_store import EmbeddedStore
from reactor.adapters.memory_bus import MemoryBus
from reactor.api import console, openapi
from reactor.api.app import Api, create_app
from reactor.api.auth import digest, load_tokens
from reactor.api.feed import Feed

pytestmark = pytest.mark.unit

WRITER, READER = "writer-token-1", "reader-token-1"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a writer `ci` and a read-only `viewer` (nothing here reads the store or the bus)."""
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"tokens:\n  {digest(WRITER)}: {{identity: ci}}\n  {digest(READER)}: {{identity: viewer, read_only: true}}\n"
    )
    api = Api(store=EmbeddedStore(), bus=MemoryBus(), feed=Feed("/reactor"), tokens=load_tokens(path))
    transport = httpx.ASGITransport(app=create_app(api))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as opened:
        yield opened


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_whoami_names_the_identity_and_whether_it_may_only_read(client: httpx.AsyncClient) -> None:
    """A writer and a reader learn who they are; without a known token it is 401 like every API path."""
    writer = await client.get("/api/v1/whoami", headers=bearer(WRITER))
    assert writer.json() == {"identity": "ci", "read_only": False, "key_id": None}
    reader = await client.get("/api/v1/whoami", headers=bearer(READER))
    assert reader.json() == {"identity": "viewer", "read_only": True, "key_id": None}
    assert (await client.get("/api/v1/whoami")).status_code == 401
    assert (await client.get("/api/v1/whoami", headers=bearer("nobody"))).status_code == 401


@pytest.mark.parametrize("path", ["/", "/releases/hello-1"])
async def test_the_page_shell_needs_no_token_and_loads_only_its_own_files(client: httpx.AsyncClient, path: str) -> None:
    """The shell holds no data, so it is served without a token; its policy allows scripts and calls to itself only."""
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/console/console.js">' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy


async def test_the_assets_are_served_from_the_package(client: httpx.AsyncClient) -> None:
    """Every file the shell names is served from reactor/api/static; nothing comes from another origin."""
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        response = await client.get(f"/console/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text
        assert "https://" not in response.text
    assert (await client.get("/console/missing.js")).status_code == 404


def test_whoami_is_in_the_openapi_document() -> None:
    """The console's one API addition is published with the others."""
    assert openapi.document()["paths"]["/api/v1/whoami"] == console.WHOAMI_PATH
