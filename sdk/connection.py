"""The AMQP connection: channels, topology, confirmed publishing, reconnects.

Everything in mrq that talks to RabbitMQ goes through `Broker`, so there is
one reconnect policy. The connection is aio-pika's robust connection: after a
drop it reconnects and restores the channels, queues, bindings and consumers
declared through it. Publishing during an outage waits for the connection,
up to `publish_timeout_s`, then raises `BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection, AbstractRobustQueue
from loguru import logger
from pamqp.commands import Basic

from sdk.errors import BrokerUnavailable, NoRoute, TopologyError
from sdk.settings import SettingsModel, mask_url

ConnectionListener = Callable[[bool], Awaitable[None] | None]

# Errors after which a publish is retried once the connection is back.
_RETRYABLE = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
)
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'.*?: (.*)$")


def new_id_prefix() -> str:
    """Return a prefix that makes counter-based ids unique across processes."""
    return f"{os.getpid():x}.{os.urandom(4).hex()}."


class Broker:
    """One robust AMQP connection with a confirmed publishing channel."""

    def __init__(self, settings: SettingsModel, *, connection_name: str) -> None:
        self.settings = settings
        self.connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._fast: AbstractRobustChannel | None = None
        self._declared_exchanges: set[str] = set()
        self._listeners: list[ConnectionListener] = []
        self._connected = asyncio.Event()
        self._ids = itertools.count(1)
        self._id_prefix = new_id_prefix()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("the broker is not connected; call connect() first")
        return self._connection

    def next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def add_listener(self, listener: ConnectionListener) -> None:
        """Call `listener(False)` when the connection drops and `listener(True)` when it is back."""
        self._listeners.append(listener)

    async def connect(self) -> None:
        """Connect, open the publishing channels and declare the application exchange."""
        self._connection = await self.open_connection()
        self._connection.close_callbacks.add(self._on_close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._fast = await self._connection.channel(publisher_confirms=False)
        self._connected.set()
        logger.debug(
            "broker connected url={} name={}", mask_url(self.settings.broker_url), self.connection_name
        )

    async def open_connection(self) -> AbstractRobustConnection:
        """Open the robust AMQP connection. `sdk.testing.MemoryBroker` overrides it with an in-memory one."""
        url = self.settings.broker_url
        try:
            return await aio_pika.connect_robust(
                url,
                timeout=self.settings.connect_timeout_s,
                reconnect_interval=1.0,
                client_properties={"connection_name": self.connection_name},
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to the broker at {mask_url(url)}: {exc or type(exc).__name__}; "
                "check that RabbitMQ runs there and that the URL and credentials are right"
            ) from None

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._connected.clear()
        if connection is not None and not connection.is_closed:
            await connection.close()

    async def _on_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if self._connection is None or not self._connected.is_set():
            return
        self._connected.clear()
        self._declared_exchanges.clear()
        logger.warning("broker connection lost url={} error={}", mask_url(self.settings.broker_url), exc)
        await self._notify(False)

    async def _on_reconnect(self, _connection: Any) -> None:
        self._connected.set()
        logger.info("broker connection restored url={}", mask_url(self.settings.broker_url))
        await self._notify(True)

    async def _notify(self, up: bool) -> None:
        for listener in tuple(self._listeners):
            try:
                result = listener(up)
                if result is not None:
                    await result
            except Exception:
                logger.exception("connection listener failed")

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the connection is up; raise BrokerUnavailable after `timeout_s`."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            raise BrokerUnavailable(
                f"the broker at {mask_url(self.settings.broker_url)} did not come back "
                f"within {timeout_s:g} s (setting publish_timeout_s)"
            ) from None

    async def channel(self, *, prefetch: int | None = None) -> AbstractRobustChannel:
        """Open a consuming channel; the robust connection reopens it after a drop."""
        channel = await self.connection.channel(publisher_confirms=False)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    @property
    def publisher(self) -> AbstractRobustChannel:
        if self._publisher is None:
            raise RuntimeError("the broker is not connected; call connect() first")
        return self._publisher

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        """Declare a durable exchange once per connection."""
        if name in self._declared_exchanges:
            return
        try:
            await self.publisher.declare_exchange(name, kind, durable=True)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _topology_error("exchange", name, exc) from None
        self._declared_exchanges.add(name)

    async def declare_queue(
        self,
        channel: AbstractRobustChannel,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> AbstractRobustQueue:
        """Declare a queue; raise TopologyError naming the differing argument on a mismatch."""
        try:
            return await channel.declare_queue(
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=dict(arguments) if arguments else None,
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _topology_error("queue", name, exc) from None

    def properties(
        self,
        *,
        content_type: str,
        headers: Mapping[str, Any] | None = None,
        persistent: bool = True,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration_ms: int | None = None,
        message_id: str | None = None,
    ) -> Basic.Properties:
        return Basic.Properties(
            content_type=content_type,
            delivery_mode=2 if persistent else 1,
            headers=dict(headers) if headers else None,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            message_id=message_id or self.next_id(),
        )

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish with a publisher confirm; wait out an outage up to `publish_timeout_s`.

        Raise NoRoute when the broker returns an unroutable mandatory message.
        A publish retried after a lost confirm may reach the queue twice.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.publish_timeout_s
        # One deadline for the whole publish: cheaper per message than wait_for, which
        # starts a task, and it also bounds a confirm that never comes.
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        await self._publish_once(exchange, routing_key, body, properties, mandatory)
                        return
                    except _RETRYABLE:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            raise self._unavailable() from None

    async def _publish_once(
        self, exchange: str, routing_key: str, body: bytes, properties: Basic.Properties, mandatory: bool
    ) -> None:
        if not self._connected.is_set():
            await self._connected.wait()
        channel = await self.publisher.get_underlay_channel()
        try:
            await channel.basic_publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
            )
        except aiormq.exceptions.PublishError as exc:
            if _reply_code(exc) == 312:
                raise NoRoute(exchange, routing_key) from None
            raise

    async def publish_nowait(
        self, exchange: str, routing_key: str, body: bytes, properties: Basic.Properties
    ) -> bool:
        """Publish without a confirm (heartbeats, replies); return False when disconnected."""
        if not self._connected.is_set() or self._fast is None:
            return False
        try:
            channel = await self._fast.get_underlay_channel()
            await channel.basic_publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties
            )
        except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError):
            return False
        return True

    def _unavailable(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"could not publish to {mask_url(self.settings.broker_url)} within "
            f"{self.settings.publish_timeout_s:g} s (setting publish_timeout_s): the broker is unreachable"
        )


def _reply_code(exc: aiormq.exceptions.PublishError) -> int | None:
    return getattr(exc.frame, "reply_code", None)


def _topology_error(kind: str, name: str, exc: Exception) -> TopologyError:
    text = str(exc.args[0] if exc.args else exc)
    match = _INEQUIVALENT.search(text)
    if match:
        argument, _, _, values = match.groups()
        return TopologyError(kind, name, f"argument {argument}: {values}")
    return TopologyError(kind, name, text)
