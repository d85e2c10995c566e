"""`reactor serve`: the HTTP API under uvicorn, with every worker role beside it in embedded mode."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
from collections.abc import Callable

import uvicorn

from reactor import logs
from reactor.api.app import Api, create_app
from reactor.api.auth import Tokens
from reactor.api.feed import Feed
from reactor.runtime import Role, load_signatures, open_backends, run_roles
from reactor.settings import Settings

log = logs.get_logger(__name__)
# Open event streams get this long to end on shutdown before they are cut.
GRACEFUL_S = 2


class _Server(uvicorn.Server):
    """uvicorn's server, ending the event streams when it stops: they would otherwise hold it until cut."""

    def __init__(self, config: uvicorn.Config, feed: Feed) -> None:
        super().__init__(config)
        self.feed = feed

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.feed.close()
        await super().shutdown(sockets)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address or localhost (only this machine's users can reach it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the address is known before serving starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    """The base URL a listening socket serves."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(settings: Settings, sock: socket.socket, tokens: Tokens | None, ready: Callable[[str], None]) -> None:
    """Serve the API on `sock` until uvicorn is told to stop (SIGINT, SIGTERM); in embedded mode run every role too.

    `ready` is called with the base URL once the roles run and the socket takes connections.
    """
    async with open_backends(settings) as backends:
        feed = Feed(settings.source)
        trust = load_signatures(settings).trust
        app = create_app(Api(store=backends.store, bus=backends.bus, feed=feed, tokens=tokens, trust=trust))
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=GRACEFUL_S
        )
        server = _Server(config, feed)
        # SIGTERM (docker stop, systemd, Kubernetes) stops like Ctrl-C: uvicorn drains, then the roles are cancelled
        # and the backends closed. uvicorn takes the signal over while it serves and raises it again when done; this
        # handler then only repeats the request to stop, so the process ends by returning, not by the signal.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, setattr, server, "should_exit", True)
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(feed.run(backends.bus))]
            if settings.mode == "embedded":
                started = asyncio.Event()
                background.append(tasks.create_task(run_roles(backends, settings, {Role.ALL}, started=started)))
                await started.wait()
            try:
                log.info("serving", url=url_of(sock), mode=settings.mode, authenticated=tokens is not None)
                ready(url_of(sock))
                await server.serve(sockets=[sock])
            finally:
                for task in background:
                    task.cancel()
