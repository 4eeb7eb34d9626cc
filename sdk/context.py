"""The context a handler receives with each message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage

if TYPE_CHECKING:
    from sdk.messenger import Messenger


class Context:
    """One delivery: its decoded body, its metadata, and a way to send more messages.

    `body` is JSON decoded to Python objects, text as `str`, anything else as
    `bytes`. `message` is the aio-pika incoming message (channel, delivery tag,
    properties). `attempt` counts from 1 and grows with every retry.
    """

    __slots__ = (
        "_messenger",
        "attempt",
        "body",
        "correlation_id",
        "headers",
        "message",
        "redelivered",
        "reply_to",
        "route",
        "routing_key",
        "service",
    )

    def __init__(
        self,
        *,
        messenger: Messenger,
        message: AbstractIncomingMessage,
        body: Any,
        service: str,
        route: str | None,
        attempt: int,
    ) -> None:
        self._messenger = messenger
        self.message = message
        self.body = body
        self.service = service
        self.route = route
        self.attempt = attempt
        self.headers: Mapping[str, Any] = message.headers or {}
        self.correlation_id: str | None = message.correlation_id
        self.reply_to: str | None = message.reply_to
        self.redelivered: bool = bool(message.redelivered)
        self.routing_key: str | None = message.routing_key

    async def send(self, target: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Send a one-way message to `target` (`service` or `service.route`)."""
        await self._messenger.send(target, body, headers=headers)

    async def call(
        self,
        target: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call `target` and return its reply; raise RemoteError, NoRoute or RpcTimeout."""
        return await self._messenger.call(target, body, timeout=timeout, headers=headers)

    async def emit(self, event: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish event `event` to every service that subscribes to it."""
        await self._messenger.emit(event, body, headers=headers)

    def __repr__(self) -> str:
        return (
            f"<Context service={self.service} route={self.route} attempt={self.attempt} "
            f"correlation_id={self.correlation_id}>"
        )
