"""The dashboard's access token: made per start, checked on every request in constant time.

A request is accepted with the token in `?token=`, in `Authorization: Bearer <token>`
or in the HttpOnly cookie that the page sets after its first authenticated load. A
state-changing request (POST) must carry the token in a header: a cookie alone is
sent by the browser on cross-site requests too, so it cannot prove that the request
came from the dashboard's own page (CSRF).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Final
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["TOKEN_HEADER", "TokenAuth", "cookie_name", "new_token", "token_matches"]

TOKEN_BYTES: Final = 24
TOKEN_HEADER: Final = "x-mrq-token"
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})


def new_token() -> str:
    """Return a random URL-safe token of TOKEN_BYTES bytes."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def cookie_name(port: int) -> str:
    """Return the cookie name for the dashboard on `port`.

    Browsers share cookies between the ports of one host, so the name carries the port:
    two supervisors on one machine then keep their own tokens.
    """
    return f"mrq_dashboard_{port}"


def token_matches(candidate: str | None, token: str) -> bool:
    """Say whether `candidate` is the token, comparing in constant time."""
    if not candidate:
        return False
    return hmac.compare_digest(candidate.encode(), token.encode())


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}


def header_token(headers: Mapping[str, str]) -> str | None:
    """Return the token of `Authorization: Bearer` or of the X-MRQ-Token header, if any."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get(TOKEN_HEADER) or None


def _query_token(scope: Scope) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


def _cookie_token(headers: Mapping[str, str], name: str) -> str | None:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # http.cookies raises CookieError and others on malformed headers
        return None
    morsel = cookie.get(name)
    return morsel.value if morsel is not None else None


class TokenAuth:
    """ASGI middleware: responds with 401 to every HTTP request without the right token.

    GET and HEAD accept the token from the query, a header or the cookie; other
    methods accept it only from a header.
    """

    def __init__(self, app: ASGIApp, *, token: str, port: int) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        candidates = [header_token(headers)]
        if scope["method"] in _SAFE_METHODS:
            candidates += [_query_token(scope), _cookie_token(headers, self.cookie)]
        if any(token_matches(candidate, self.token) for candidate in candidates):
            await self.app(scope, receive, send)
            return
        await _reject(send, scope["method"] not in _SAFE_METHODS)

    def __repr__(self) -> str:
        return f"TokenAuth(cookie={self.cookie!r})"


async def _reject(send: Send, state_changing: bool) -> None:
    if state_changing:
        text = (
            "401 Unauthorized: this request changes state, so it needs the dashboard token in "
            "the Authorization: Bearer or X-MRQ-Token header; a cookie alone is not accepted\n"
        )
    else:
        text = (
            "401 Unauthorized: missing or wrong dashboard token; open the URL with ?token= that "
            "`mrq-supervisor start` printed, or send Authorization: Bearer <token>\n"
        )
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="mrq dashboard"'),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
