"""The web console: a page shell and its static assets (no build step, nothing from a CDN), and `whoami`.

The pages read everything through the HTTP API with the bearer token the user gives; the shell itself holds no data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from reactor.api.auth import Identity

if TYPE_CHECKING:
    from reactor.api.app import Api

STATIC = Path(__file__).parent / "static"
# The console loads only its own files and talks only to its own origin; nothing may frame it.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
# The OpenAPI entry of `GET /api/v1/whoami` (reactor.api.openapi puts it among the paths).
WHOAMI_PATH = {
    "get": {
        "operationId": "whoami",
        "summary": "Who the bearer token acts as, whether it may only read, and the key its commands are signed with.",
        "responses": {
            "200": {
                "description": "The identity.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "identity": {"type": "string"},
                                "read_only": {"type": "boolean"},
                                "key_id": {
                                    "type": ["string", "null"],
                                    "description": "The id of the key the API signs this identity's commands"
                                    " with; null: they are signed as the server signs (its own key, if any).",
                                },
                            },
                            "required": ["identity", "read_only", "key_id"],
                        }
                    }
                },
            },
            "401": {"description": "No known bearer token.", "content": _ERROR},
        },
    }
}


async def page(request: Request) -> Response:
    """The console's page shell; the script picks the view (release list or one release) from the path."""
    return FileResponse(STATIC / "console.html", media_type="text/html", headers=HEADERS)


async def whoami(api: Api, request: Request, identity: Identity) -> Response:
    """Who the bearer token acts as, and whether it may only read (the console hides its buttons then)."""
    key_id = None if identity.key is None else identity.key.key_id
    return JSONResponse({"identity": identity.name, "read_only": identity.read_only, "key_id": key_id})


def routes() -> list[Route | Mount]:
    """The console's pages and assets: `/`, `/releases/{release_id}` and `/console/...`."""
    return [
        Route("/", page, methods=["GET"]),
        Route("/releases/{release_id}", page, methods=["GET"]),
        Mount("/console", StaticFiles(directory=STATIC), name="console"),
    ]
