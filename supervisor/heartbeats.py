"""Receiving the hellos, heartbeats and goodbyes of this node's workers.

Consuming every heartbeat as it arrives costs one wake-up and one AMQP
delivery each: with 50 instances at one heartbeat per second that alone
measured about 2 % of a core here. So the listener streams only while it
needs news at once (an instance is starting and its first heartbeat makes it
ready). Otherwise it pulls: when a heartbeat deadline falls due it consumes
what has queued up, in one burst, up to a marker message it publishes behind
it. The queue keeps heartbeats for `interval × misses`, so the latest one of
every live worker is always there.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustQueue
from loguru import logger

from sdk.codec import BINARY
from sdk.connection import Broker
from sdk.wire import Goodbye, Heartbeat, Hello, WireError, decode

WorkerMessage = Hello | Heartbeat | Goodbye
_MARKER_HEADER = "x-mrq-marker"
_PULL_TIMEOUT_S = 2.0


class HeartbeatListener:
    """Delivers the worker messages of one node to `on_message`, streaming or in pulls."""

    def __init__(
        self,
        broker: Broker,
        node: str,
        ttl_s: float,
        on_message: Callable[[WorkerMessage], None],
    ) -> None:
        self.broker = broker
        self.node = node
        self.ttl_ms = max(int(ttl_s * 1000), 100)
        self.on_message = on_message
        self.queue_name = f"mrq.supervisor.{node}.workers.{os.getpid()}"
        self._queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._streaming = False
        self._markers: dict[str, asyncio.Future[None]] = {}
        self._mode_lock = asyncio.Lock()
        self._invalid = 0

    @property
    def streaming(self) -> bool:
        return self._streaming

    async def start(self) -> None:
        exchange = self.broker.settings.control_exchange
        await self.broker.declare_exchange(exchange)
        channel = await self.broker.channel()
        self._queue = await self.broker.declare_queue(
            channel,
            self.queue_name,
            durable=False,
            # Not auto-delete: a pull cancels the only consumer, which would delete the queue.
            exclusive=True,
            arguments={"x-message-ttl": self.ttl_ms},
        )
        for kind in ("hello", "heartbeat", "goodbye"):
            await self._queue.bind(exchange, f"{kind}.{self.node}.#")

    async def set_streaming(self, on: bool) -> None:
        """Consume continuously (`on`) or only during pulls."""
        async with self._mode_lock:
            if on == self._streaming:
                return
            self._streaming = on
            if on:
                await self._consume()
            else:
                await self._cancel()

    async def pull(self) -> bool:
        """Take in everything queued so far; return False when the broker did not answer in time."""
        if self._streaming:
            return True
        async with self._mode_lock:
            if self.streaming:
                return True
            marker = os.urandom(8).hex()
            arrived = asyncio.get_running_loop().create_future()
            self._markers[marker] = arrived
            try:
                await self._consume()
                properties = self.broker.properties(
                    content_type=BINARY, headers={_MARKER_HEADER: marker}, persistent=False
                )
                if not await self.broker.publish_nowait("", self.queue_name, b"", properties):
                    return False
                async with asyncio.timeout(_PULL_TIMEOUT_S):
                    await arrived
                return True
            except (TimeoutError, ConnectionError) as exc:
                logger.debug("heartbeat pull incomplete error={}", exc or type(exc).__name__)
                return False
            finally:
                self._markers.pop(marker, None)
                await self._cancel()

    async def _consume(self) -> None:
        if self._consumer_tag is None and self._queue is not None:
            self._consumer_tag = await self._queue.consume(self._on_delivery, no_ack=True)

    async def _cancel(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is not None and self._queue is not None:
            try:
                async with asyncio.timeout(_PULL_TIMEOUT_S):
                    await self._queue.cancel(tag)
            except Exception as exc:
                logger.debug("heartbeat consumer cancel failed error={}", exc)

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers
        if headers and _MARKER_HEADER in headers:
            marker = headers[_MARKER_HEADER]
            text = marker.decode() if isinstance(marker, bytes) else str(marker)
            future = self._markers.get(text)
            if future is not None and not future.done():
                future.set_result(None)
            return
        try:
            decoded = decode(message.body)
        except WireError as exc:
            self._count_invalid(str(exc))
            return
        if isinstance(decoded, Hello | Heartbeat | Goodbye):
            self.on_message(decoded)
        else:
            self._count_invalid(f"unexpected message type {decoded.type!r}")

    def _count_invalid(self, reason: str) -> None:
        self._invalid += 1
        if self._invalid in (1, 10, 100) or self._invalid % 1000 == 0:
            logger.warning("invalid worker message ignored reason={} count={}", reason, self._invalid)
