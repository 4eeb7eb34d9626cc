"""Signing and checking control messages with the cluster key (HMAC-SHA256).

The signature covers the exact body bytes and travels in the
`x-mrq-signature` header as lower-case hex. A receiver checks, in order: the
size, the signature, the JSON format, the age of `issued_at` against its
window, and that it has not seen the nonce `id` before.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from sdk import names
from sdk.errors import SignatureError
from sdk.wire import Command, Reply, WireError, decode

MAX_COMMAND_BYTES = 64 * 1024


def signature(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return os.urandom(16).hex()


def sign_headers(key: bytes, body: bytes) -> dict[str, Any]:
    return {names.H_SIGNATURE: signature(key, body)}


def make_command(name: str, args: Mapping[str, Any] | None = None, *, sender: str) -> Command:
    return Command(id=new_nonce(), issued_at=time.time(), sender=sender, name=name, args=dict(args or {}))


def check_signature(key: bytes, body: bytes, headers: Mapping[str, Any] | None) -> None:
    """Raise SignatureError unless `headers` carry a valid signature of `body`."""
    given = (headers or {}).get(names.H_SIGNATURE)
    if isinstance(given, bytes):
        given = given.decode(errors="replace")
    if not given:
        raise SignatureError("unsigned: no x-mrq-signature header")
    if not isinstance(given, str) or not given.isascii():
        raise SignatureError("bad signature: the x-mrq-signature header is not lower-case hex")
    if not hmac.compare_digest(given, signature(key, body)):
        raise SignatureError("bad signature: signed with another key, or the body was changed")


class CommandVerifier:
    """Accepts a signed command once, within `max_age_s` of its time stamp."""

    def __init__(self, key: bytes, *, max_age_s: float, max_bytes: int = MAX_COMMAND_BYTES) -> None:
        self._key = key
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, body: bytes, headers: Mapping[str, Any] | None, *, now: float | None = None) -> Command:
        """Return the command, or raise SignatureError saying why it was rejected."""
        if len(body) > self.max_bytes:
            raise SignatureError(f"oversized: {len(body)} bytes, the limit is {self.max_bytes}")
        check_signature(self._key, body, headers)
        try:
            message = decode(body)
        except WireError as exc:
            raise SignatureError(f"malformed: {exc}") from None
        if not isinstance(message, Command):
            raise SignatureError(f"malformed: expected a command, got {message.type!r}")
        now = time.time() if now is None else now
        age_s = now - message.issued_at
        if age_s > self.max_age_s:
            raise SignatureError(f"stale: issued {age_s:.1f} s ago, the window is {self.max_age_s:g} s")
        if age_s < -self.max_age_s:
            raise SignatureError(f"from the future: issued {-age_s:.1f} s ahead of this clock")
        self._forget_expired(now)
        if message.id in self._seen:
            raise SignatureError(f"replayed: nonce {message.id} was already used")
        self._seen[message.id] = now + 2 * self.max_age_s
        return message

    def _forget_expired(self, now: float) -> None:
        while self._seen:
            _nonce, expires_at = next(iter(self._seen.items()))
            if expires_at > now:
                break
            self._seen.popitem(last=False)


def verify_reply(key: bytes, body: bytes, headers: Mapping[str, Any] | None) -> Reply:
    """Return a signed reply, or raise SignatureError."""
    check_signature(key, body, headers)
    try:
        message = decode(body)
    except WireError as exc:
        raise SignatureError(f"malformed reply: {exc}") from None
    if not isinstance(message, Reply):
        raise SignatureError(f"malformed reply: expected a reply, got {message.type!r}")
    return message
