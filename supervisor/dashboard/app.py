"""The dashboard extension: an ASGI app on uvicorn, inside the supervisor's own event loop.

`Dashboard` is a node extension (`node.extensions`): `start(node)` binds the
address of the `dashboard` setting, makes a new random token, sets
`node.dashboard_url` (printed at start-up) and serves the page, the API and
`/metrics` until `stop()`. Every request needs the token (see `auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

import anyio
import uvicorn
from loguru import logger
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.dashboard import metrics
from supervisor.dashboard.api import Api
from supervisor.dashboard.auth import TokenAuth, cookie_name, new_token
from supervisor.dashboard.cluster import Cluster, EventFanout
from supervisor.node import StartupError

if TYPE_CHECKING:
    from supervisor.node import Node

__all__ = ["Dashboard", "DashboardError", "build_app"]

STOP_TIMEOUT_S: Final = 10.0
# uvicorn waits this long for open responses after stop() before it cancels them.
GRACEFUL_SHUTDOWN_S: Final = 3
STATIC_FILES: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS: Final = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"form-action 'none'; frame-ancestors 'none'",
    ),
]


class DashboardError(StartupError):
    """The dashboard cannot start; the message names the address and the setting to change."""


@dataclass(frozen=True)
class StaticFiles:
    """The page and its assets, read once from the package."""

    index: str
    assets: dict[str, bytes]

    @classmethod
    def load(cls) -> StaticFiles:
        folder = resources.files("supervisor.dashboard") / "static"
        assets = {name: (folder / name).read_bytes() for name in STATIC_FILES}
        return cls(index=(folder / "index.html").read_text(encoding="utf-8"), assets=assets)


class Dashboard:
    """A node extension that serves the web dashboard and `/metrics`."""

    def __init__(self) -> None:
        self.token = ""
        self.url: str | None = None
        self.closing: anyio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._cluster: Cluster | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"Dashboard(url={_without_token(self.url)!r})"

    async def start(self, node: Node) -> None:
        """Bind the `dashboard` address and serve; raise DashboardError when the address is taken."""
        address = node.settings.dashboard_address()
        if address is None or node.task_group is None:
            return
        host, port = address
        static = await anyio.to_thread.run_sync(StaticFiles.load)
        sock = await anyio.to_thread.run_sync(bind, host, port)
        self.token = new_token()
        self.closing, self._stopped = anyio.Event(), anyio.Event()
        fanout = EventFanout()
        self._cluster = Cluster(node, fanout, lambda: fanout.subscribers)
        api = Api(node, self._cluster, fanout, self.closing)
        app = build_app(api, node, static, token=self.token, port=port)
        self._server = _EmbeddedServer(_server_config(app))
        await self._cluster.start()
        self.url = f"http://{_url_host(host)}:{port}/?token={self.token}"
        node.dashboard_url = self.url  # type: ignore[attr-defined]
        run = self._run(self._server, self._cluster, sock, self._stopped)
        self._task = node.task_group.create_task(run, name="dashboard")
        logger.info("dashboard started node={} address={}:{}", node.node, _url_host(host), port)

    @staticmethod
    async def _run(
        server: uvicorn.Server, cluster: Cluster, sock: socket.socket, stopped: anyio.Event
    ) -> None:
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(cluster.run)
                await server.serve(sockets=[sock])
                task_group.cancel_scope.cancel()
        except Exception as exc:
            # The dashboard must never take the supervisor down with it.
            logger.opt(exception=exc).error("dashboard failed and stopped error={}", exc)
        finally:
            sock.close()
            stopped.set()

    async def stop(self) -> None:
        """Close the open streams, stop the server and wait for it for at most STOP_TIMEOUT_S."""
        if self._server is None or self.closing is None or self._stopped is None:
            return
        self.closing.set()
        self._server.should_exit = True
        with anyio.move_on_after(STOP_TIMEOUT_S):
            await self._stopped.wait()
        if not self._stopped.is_set() and self._task is not None:
            logger.warning("dashboard did not stop within {} s; cancelling it", STOP_TIMEOUT_S)
            self._task.cancel()
        if self._cluster is not None:
            await self._cluster.close()
        logger.info("dashboard stopped")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the node handles SIGTERM, SIGINT and SIGHUP itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server_config(app: ASGIApp) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        # The page's first request carries the token in its query, so no access log.
        access_log=False,
        # Library code leaves logging alone: uvicorn's default config would replace handlers.
        log_config=None,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def bind(host: str, port: int) -> socket.socket:
    """Return a TCP socket bound to (host, port); raise DashboardError naming the setting if that fails."""
    where = f"{_url_host(host)}:{port}"
    fix = 'set `dashboard` in [supervisor] to another "HOST:PORT", or to "off"'
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise DashboardError(f"dashboard address {where} cannot be resolved ({exc}); {fix}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise DashboardError(
            f"dashboard address {where} {reason}; stop the program that listens there, or {fix}"
        ) from exc
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _without_token(url: str | None) -> str | None:
    return None if url is None else url.partition("?")[0]


def build_app(api: Api, node: Node, static: StaticFiles, *, token: str, port: int) -> ASGIApp:
    """Return the ASGI app: the routes behind the token check and the security headers."""
    registry = metrics.metrics_registry(node)
    page = static.index.replace("__MRQ_TOKEN__", html.escape(token)).replace(
        "__MRQ_NODE__", html.escape(node.node)
    )
    cookie = cookie_name(port)

    async def index(request: Request) -> Response:
        response = Response(
            page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"}
        )
        response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
        return response

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static.assets:
            return Response("not found\n", status_code=404, media_type="text/plain")
        return Response(
            static.assets[name], media_type=STATIC_FILES[name], headers={"cache-control": "no-cache"}
        )

    async def metrics_endpoint(request: Request) -> Response:
        await api.local.read()  # pulls the heartbeats, so heartbeat ages are fresh
        body = await anyio.to_thread.run_sync(metrics.render, registry)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    routes = [
        Route("/", index),
        Route("/static/{name}", asset),
        Route("/metrics", metrics_endpoint),
        Route("/api/status", api.status),
        Route("/api/stream", api.stream),
        Route("/api/events", api.events),
        Route("/api/logs", api.logs),
        Route("/api/action", api.action, methods=["POST"]),
        Route("/api/send", api.send, methods=["POST"]),
        Route("/api/call", api.call, methods=["POST"]),
    ]
    middleware = [Middleware(_SecurityHeaders), Middleware(TokenAuth, token=token, port=port)]
    return Starlette(routes=routes, middleware=middleware)


class _SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response, the 401 responses included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
