"""send, call and emit over one `Broker`, with the RPC reply consumer."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import math
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

    def _encode(self, body: Any, headers: Mapping[str, Any] | None) -> tuple[bytes, str]:
        """Encode a body and check it and the headers before the broker sees them."""
        data, content_type = codec.encode(body)
        limit = self.broker.settings.max_message_bytes
        if len(data) > limit:
            raise ValueError(
                f"the message body has {len(data)} bytes, more than max_message_bytes={limit} "
                "(RabbitMQ rejects bodies over 128 MiB by default); send a reference to the data instead"
            )
        if headers:
            check_headers(headers)
        return data, content_type

    async def send(self, target: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        data, content_type = self._encode(body, headers)
        properties = self.broker.properties(content_type=content_type, headers=headers)
        await self.broker.publish(self.exchange, target, data, properties)

    async def emit(self, event: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish an event; with no subscriber the event is dropped, not an error."""
        data, content_type = self._encode(body, headers)
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
        if not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout_s!r}")
        data, content_type = self._encode(body, headers)
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


_HEADER_SCALARS = (str, bytes, bool, int, decimal.Decimal, datetime.datetime, type(None))


def check_headers(headers: Mapping[str, Any], path: str = "") -> None:
    """Raise ValueError for a header value that an AMQP table cannot carry faithfully.

    RabbitMQ closes the whole connection on a NaN or infinite float, and the
    client library rejects tuples and other types, so they are caught here.
    """
    for key, value in headers.items():
        name = f"{path}{key}"
        if not isinstance(key, str):
            raise ValueError(f"header key {key!r} is not a string")
        _check_header_value(name, value)


def _check_header_value(name: str, value: Any) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"header {name!r} is {value!r}: AMQP cannot carry NaN or infinite numbers")
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValueError(f"header {name!r} is {value}, outside the 64-bit range of AMQP integers")
    elif isinstance(value, Mapping):
        check_headers(value, f"{name}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_header_value(f"{name}[{index}]", item)
    elif not isinstance(value, _HEADER_SCALARS):
        raise ValueError(
            f"header {name!r} has type {type(value).__name__}; use str, bytes, bool, int, float, "
            "Decimal, datetime, None, a list or a dict of these"
        )


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
