"""The harness's own AMQP connection: timestamps control messages on arrival and preloads queues."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import aio_pika
import anyio
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from bench.roles.protocol import payload

CONNECT_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 30.0
# Arrivals kept for later waits; heartbeats come one per second per worker, so this is plenty.
BACKLOG_MAX = 10_000


@dataclass(frozen=True)
class Arrival:
    """A message of the control exchange and the `time.monotonic()` at which it arrived."""

    routing_key: str
    body: bytes
    arrived_s: float


class ControlObserver:
    """Consumes everything published to a control exchange and keeps each message with its arrival time."""

    def __init__(self, broker_url: str, control_exchange: str) -> None:
        self.broker_url = broker_url
        self.control_exchange = control_exchange
        self._backlog: deque[Arrival] = deque(maxlen=BACKLOG_MAX)
        self._arrived = anyio.Event()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> ControlObserver:
        with anyio.fail_after(SETUP_TIMEOUT_S):
            self._connection = await aio_pika.connect(self.broker_url, timeout=CONNECT_TIMEOUT_S)
            self._channel = await self._connection.channel()
            exchange = await self._channel.declare_exchange(
                self.control_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, "#")
            await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._connection is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_TIMEOUT_S):
                await self._connection.close()

    @property
    def channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("the observer is not connected; use it as an async context manager")
        return self._channel

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        arrived_s = time.monotonic()
        self._backlog.append(Arrival(message.routing_key or "", message.body, arrived_s))
        arrived, self._arrived = self._arrived, anyio.Event()
        arrived.set()

    async def wait_for(self, matches: Callable[[Arrival], bool], timeout_s: float, what: str) -> Arrival:
        """Remove and return the first arrival that `matches`; raise TimeoutError naming `what`.

        Arrivals that do not match stay for later calls, so that two waits may
        run in either order.
        """
        with anyio.move_on_after(timeout_s):
            while True:
                for arrival in self._backlog:
                    if matches(arrival):
                        self._backlog.remove(arrival)
                        return arrival
                await self._arrived.wait()
        raise TimeoutError(f"no {what} arrived on exchange {self.control_exchange} within {timeout_s:g} s")

    async def declare_queue(self, name: str) -> AbstractQueue:
        """Declare a durable classic queue with no arguments, as mrq declares a route's queue."""
        with anyio.fail_after(SETUP_TIMEOUT_S):
            return await self.channel.declare_queue(name, durable=True)

    async def queue_depth(self, name: str) -> int:
        """Return the number of ready messages in queue `name`."""
        with anyio.fail_after(SETUP_TIMEOUT_S):
            queue = await self.channel.declare_queue(name, passive=True)
        declared = queue.declaration_result
        return int(declared.message_count or 0)


async def preload(broker_url: str, queue: str, count: int, window: int, timeout_s: float) -> None:
    """Publish `count` persistent JSON messages straight to `queue`, `window` confirms in flight."""
    with anyio.fail_after(timeout_s):
        connection = await aio_pika.connect(broker_url, timeout=CONNECT_TIMEOUT_S)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            sequence = itertools.count()

            async def publish_some() -> None:
                while (index := next(sequence)) < count:
                    message = aio_pika.Message(
                        orjson.dumps(payload(index)),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    )
                    await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)

            async with anyio.create_task_group() as tasks:
                for _ in range(min(window, count)):
                    tasks.start_soon(publish_some)
        finally:
            with anyio.CancelScope(shield=True):
                await connection.close()
