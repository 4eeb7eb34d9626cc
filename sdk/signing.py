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
from collections.abc import Collection, Mapping
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


def make_command(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    sender: str,
    target: str | None = None,
    ttl_s: float | None = None,
) -> Command:
    """Build a command for `target` (a routing key) that must not run after `ttl_s` seconds."""
    issued_at = time.time()
    return Command(
        id=new_nonce(),
        issued_at=issued_at,
        sender=sender,
        name=name,
        args=dict(args or {}),
        target=target,
        expires_at=issued_at + ttl_s if ttl_s is not None else None,
    )


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
    """Accepts a signed command once, within `max_age_s` of its time stamp.

    With `targets`, only commands addressed to one of those routing keys pass.
    With `not_before` (the receiver's start time), a command issued earlier is
    rejected, because the nonces it may have used died with the previous process.
    """

    def __init__(
        self,
        key: bytes,
        *,
        max_age_s: float,
        targets: Collection[str] | None = None,
        not_before: float | None = None,
        max_bytes: int = MAX_COMMAND_BYTES,
    ) -> None:
        self._key = key
        self.max_age_s = max_age_s
        self.targets = frozenset(targets) if targets is not None else None
        self.not_before = not_before
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
        self._check_addressing(message, now)
        self._forget_expired(now)
        if message.id in self._seen:
            raise SignatureError(f"replayed: nonce {message.id} was already used")
        self._seen[message.id] = now + 2 * self.max_age_s
        return message

    def _check_addressing(self, message: Command, now: float) -> None:
        if self.targets is not None and message.target not in self.targets:
            accepted = ", ".join(sorted(self.targets))
            raise SignatureError(
                f"misdirected: addressed to {message.target!r}, this receiver takes {accepted}"
            )
        if message.expires_at is not None and now > message.expires_at:
            raise SignatureError(f"expired: its sender stopped waiting {now - message.expires_at:.1f} s ago")
        if self.not_before is not None and message.issued_at < self.not_before:
            raise SignatureError("stale: issued before this receiver started, so it may be a replay")

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
