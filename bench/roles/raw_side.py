"""The raw aio-pika side of the throughput and RPC benchmarks: the same work, written by hand.

Roles (the first argument): consumer, producer, rpc-server, rpc-client. Each
uses a plain `aio_pika.connect` connection on uvloop and puts on the wire
what the mrq side does. Queues are durable and bound to a topic exchange,
messages are published with a confirm and `mandatory=True`, and consumers
ack by hand. RPC replies come over the direct reply-to pseudo-queue to one
consumer that resolves a future per correlation id.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from typing import Any

import aio_pika
import orjson
import uvloop
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from bench.roles.protocol import cpu_s, emit, now_s, params, payload, role

JSON = "application/json"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


async def _consuming_queue(
    channel: AbstractChannel, p: dict[str, Any]
) -> tuple[AbstractExchange, aio_pika.abc.AbstractQueue]:
    await channel.set_qos(prefetch_count=p["prefetch"])
    exchange = await channel.declare_exchange(p["exchange"], aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(p["queue"], durable=True)
    await queue.bind(exchange, p["queue"])
    return exchange, queue


async def consume(p: dict[str, Any]) -> None:
    """Decode and ack `messages` deliveries one by one, then report."""
    expected = p["messages"]
    count = acked = 0
    first_s = first_cpu_s = 0.0
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count, acked, first_s, first_cpu_s
        count += 1
        if count == 1:
            first_s, first_cpu_s = now_s(), cpu_s()
        orjson.loads(message.body)
        await message.ack()
        acked += 1
        if acked == expected:
            done.set()

    async with asyncio.timeout(p["deadline_s"]):
        connection = await aio_pika.connect(p["broker_url"])
        _, queue = await _consuming_queue(await connection.channel(), p)
        await queue.consume(on_message)
        emit("ready")
        await done.wait()
        end_s, end_cpu_s = now_s(), cpu_s()
        emit(
            "result",
            messages=acked,
            first_s=first_s,
            end_s=end_s,
            cpu_s=end_cpu_s - first_cpu_s,
            total_cpu_s=end_cpu_s,
        )
        await connection.close()


async def produce(p: dict[str, Any]) -> None:
    """Publish `messages` persistent messages with `window` confirms in flight, then report."""
    count = p["messages"]
    async with asyncio.timeout(p["deadline_s"]):
        connection = await aio_pika.connect(p["broker_url"])
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(p["exchange"], aio_pika.ExchangeType.TOPIC, durable=True)
        sequence = itertools.count()

        async def publish_some() -> None:
            while (index := next(sequence)) < count:
                message = aio_pika.Message(
                    orjson.dumps(payload(index)),
                    content_type=JSON,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await exchange.publish(message, routing_key=p["target"], mandatory=True)

        start_s, start_cpu_s = now_s(), cpu_s()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(min(p["window"], count)):
                tasks.create_task(publish_some())
        emit("result", messages=count, start_s=start_s, end_s=now_s(), cpu_s=cpu_s() - start_cpu_s)
        await connection.close()


async def serve_rpc(p: dict[str, Any]) -> None:
    """Reply to each request with its own body on the consuming channel, then ack; stop on SIGTERM."""
    calls = 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with asyncio.timeout(p["deadline_s"]):
        connection = await aio_pika.connect(p["broker_url"])
        channel = await connection.channel()
        _, queue = await _consuming_queue(channel, p)

        async def on_request(message: AbstractIncomingMessage) -> None:
            nonlocal calls
            body = orjson.loads(message.body)
            reply = aio_pika.Message(
                orjson.dumps(body), content_type=JSON, correlation_id=message.correlation_id
            )
            await channel.default_exchange.publish(reply, routing_key=message.reply_to or "")
            await message.ack()
            calls += 1

        await queue.consume(on_request)
        emit("ready")
        start_cpu_s = cpu_s()
        await stop.wait()
        emit("result", calls=calls, cpu_s=cpu_s() - start_cpu_s)
        await connection.close()


class RawCaller:
    """RPC over direct reply-to: one reply consumer and a future per correlation id."""

    def __init__(self, exchange: AbstractExchange, target: str, timeout_s: float) -> None:
        self.exchange = exchange
        self.target = target
        self.timeout_s = timeout_s
        self.pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.ids = itertools.count(1)
        self.prefix = f"{os.getpid():x}.{os.urandom(4).hex()}."

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def call(self, body: Any) -> Any:
        correlation_id = f"{self.prefix}{next(self.ids)}"
        future = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        message = aio_pika.Message(
            orjson.dumps(body),
            content_type=JSON,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.exchange.publish(message, routing_key=self.target, mandatory=True)
                reply = await future
        finally:
            self.pending.pop(correlation_id, None)
        return orjson.loads(reply.body)


async def call_rpc(p: dict[str, Any]) -> None:
    """Warm up, time sequential calls one by one, then time calls with `window` in flight."""
    async with asyncio.timeout(p["deadline_s"]):
        connection = await aio_pika.connect(p["broker_url"])
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(p["exchange"], aio_pika.ExchangeType.TOPIC, durable=True)
        caller = RawCaller(exchange, p["target"], p["call_timeout_s"])
        replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await replies.consume(caller.on_reply, no_ack=True)
        for index in range(p["warmup"]):
            await caller.call(payload(index))
        latencies_s = []
        sequential_cpu_s = cpu_s()
        for index in range(p["calls"]):
            started = time.perf_counter()
            await caller.call(payload(index))
            latencies_s.append(time.perf_counter() - started)
        sequential_cpu_s = cpu_s() - sequential_cpu_s
        concurrent = await _concurrent_calls(caller, p["concurrent_calls"], p["window"])
        emit("result", latencies_s=latencies_s, sequential_cpu_s=sequential_cpu_s, **concurrent)
        await connection.close()


async def _concurrent_calls(caller: RawCaller, count: int, window: int) -> dict[str, float]:
    sequence = itertools.count()

    async def call_some() -> None:
        while (index := next(sequence)) < count:
            await caller.call(payload(index))

    start_s, start_cpu_s = now_s(), cpu_s()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(min(window, count)):
            tasks.create_task(call_some())
    return {"concurrent_s": now_s() - start_s, "concurrent_cpu_s": cpu_s() - start_cpu_s}


ROLES = {"consumer": consume, "producer": produce, "rpc-server": serve_rpc, "rpc-client": call_rpc}

if __name__ == "__main__":
    uvloop.run(ROLES[role()](params()))
