"""send, call and emit over one `Broker`, with the RPC reply consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from loguru import logger

from sdk import codec, names
from sdk.connection import Broker
from sdk.errors import RemoteError, ReplyLost, RpcTimeout


class Messenger:
    """Publishes application messages and matches RPC replies to their calls.

    Replies come over RabbitMQ's direct reply-to through one long-lived
    consumer on the publishing channel; each call waits on a future keyed by
    its correlation id.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.exchange = broker.settings.exchange
        self._pending: dict[str, tuple[asyncio.Future[AbstractIncomingMessage], str]] = {}
        self._reply_consumer_started = False

    async def start(self) -> None:
        """Declare the application exchange and start the reply consumer."""
        await self.broker.declare_exchange(self.exchange)
        queue = await self.broker.publisher.declare_queue(names.DIRECT_REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)
        self.broker.add_listener(self._on_connection_change)
        self._reply_consumer_started = True

    def _on_connection_change(self, up: bool) -> None:
        if up:
            return
        # A reply addressed to the old channel can no longer arrive.
        for correlation_id, (future, target) in list(self._pending.items()):
            if not future.done():
                future.set_exception(ReplyLost(target))
            self._pending.pop(correlation_id, None)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        entry = self._pending.pop(message.correlation_id or "", None)
        if entry is None:
            logger.debug("reply without a waiting call correlation_id={}", message.correlation_id)
            return
        future = entry[0]
        if not future.done():
            future.set_result(message)

    async def send(self, target: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        data, content_type = codec.encode(body)
        properties = self.broker.properties(content_type=content_type, headers=headers)
        await self.broker.publish(self.exchange, target, data, properties)

    async def emit(self, event: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish an event; with no subscriber the event is dropped, not an error."""
        data, content_type = codec.encode(body)
        properties = self.broker.properties(content_type=content_type, headers=headers)
        await self.broker.publish(
            self.exchange, names.event_routing_key(event), data, properties, mandatory=False
        )

    async def call(
        self,
        target: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        reply = await self.call_raw(target, body, timeout=timeout, headers=headers)
        return decode_reply(target, reply)

    async def call_raw(
        self,
        target: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> AbstractIncomingMessage:
        """Call `target` and return the reply message itself."""
        if not self._reply_consumer_started:
            raise RuntimeError("the messenger is not started")
        timeout_s = self.broker.settings.rpc_timeout_s if timeout is None else timeout
        data, content_type = codec.encode(body)
        correlation_id = self.broker.next_id()
        properties = self.broker.properties(
            content_type=content_type,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=names.DIRECT_REPLY_TO,
            persistent=False,
            expiration_ms=max(int(timeout_s * 1000), 1),
        )
        future: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = (future, target)
        try:
            async with asyncio.timeout(timeout_s):
                await self.broker.publish(self.exchange, target, data, properties)
                return await future
        except TimeoutError:
            raise RpcTimeout(target, timeout_s) from None
        finally:
            self._pending.pop(correlation_id, None)


def decode_reply(target: str, reply: AbstractIncomingMessage) -> Any:
    """Return the value of a reply, or raise RemoteError for an error reply."""
    status = (reply.headers or {}).get(names.H_STATUS, names.STATUS_OK)
    if status == names.STATUS_ERROR:
        try:
            error = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            error = {"type": "Error", "message": reply.body.decode(errors="replace")}
        raise RemoteError(
            target, str(error.get("type", "Error")), str(error.get("message", "")), error.get("errors")
        )
    return codec.decode(reply.body, reply.content_type)
