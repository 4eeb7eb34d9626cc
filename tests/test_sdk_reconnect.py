"""The SDK across broker failures: a connection cut mid-stream, a broker restart, an outage.

These tests cut off and restart a broker, so each runs against a private
RabbitMQ node of its own (supervisor.broker.PrivateBroker), never the shared one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from sdk import BrokerUnavailable, Client, Context, Service, route
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import SettingsModel, settings
from supervisor.broker import PrivateBroker

pytestmark = [pytest.mark.private_broker, pytest.mark.timeout(240)]

START_TIMEOUT_S = 60.0


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path / "rabbit")
    await broker.start(START_TIMEOUT_S)
    try:
        yield broker
    finally:
        await broker.stop()


def _settings(node: PrivateBroker, **overrides: Any) -> SettingsModel:
    return settings.resolve(broker_url=node.url, exchange="reconnect", retry_delay_s=0.05, **overrides)


async def _queue_depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def _wait_until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.anyio
async def test_connection_closed_mid_stream_loses_nothing(node: PrivateBroker) -> None:
    seen: list[int] = []

    class Sink(Service):
        name = "sink"
        prefetch = 64

        @route("put")
        async def put(self, ctx: Context) -> None:
            await asyncio.sleep(0.002)
            seen.append(ctx.body["n"])

    resolved = _settings(node)
    host = ServiceHost(registry.specs(), resolved)
    await host.start()
    try:
        async with Client(node.url, exchange="reconnect") as client:
            sends = [client.send("sink.put", {"n": n}) for n in range(1000)]
            await asyncio.gather(*sends[:500])
            await _wait_until(lambda: len(set(seen)) >= 100, 30)
            closed = await node.close_connections("mrq run services=sink")
            assert closed == 1
            await asyncio.gather(*sends[500:])
            await _wait_until(lambda: len(set(seen)) == 1000, 120)
        await _wait_until(lambda: host.stats.in_flight == 0, 30)
    finally:
        await host.stop()
    assert set(seen) == set(range(1000))
    assert await _queue_depth(node.url, "sink.put") == 0


@pytest.mark.anyio
async def test_consumers_and_rpc_come_back_after_broker_restart(node: PrivateBroker) -> None:
    class Echo(Service):
        name = "echo"

        @route("say")
        async def say(self, body: str) -> str:
            return body.upper()

    host = ServiceHost(registry.specs(), _settings(node))
    await host.start()
    try:
        async with Client(node.url, exchange="reconnect", publish_timeout_s=60) as client:
            assert await client.call("echo.say", "before", timeout=10) == "BEFORE"
            await node.restart()
            await _wait_until(lambda: client.broker.connected and host.broker.connected, 60)
            reply = None
            deadline = time.monotonic() + 60
            while reply is None:
                try:
                    reply = await client.call("echo.say", "after", timeout=5)
                except (TimeoutError, ConnectionError):
                    assert time.monotonic() < deadline, "no reply after the broker came back"
                    await asyncio.sleep(0.5)
            assert reply == "AFTER"
    finally:
        await host.stop()


@pytest.mark.anyio
async def test_publish_during_outage_waits_then_succeeds(node: PrivateBroker) -> None:
    async with Client(node.url, exchange="reconnect", publish_timeout_s=90) as client:
        connection = await aio_pika.connect(node.url)
        channel = await connection.channel()
        queue = await channel.declare_queue("outage.q", durable=True)
        await queue.bind("reconnect", "outage.q")
        await connection.close()
        await node.stop()
        sending = asyncio.ensure_future(client.send("outage.q", {"kept": True}))
        await asyncio.sleep(2)
        assert not sending.done(), "the send gave up while the broker was down"
        await node.start(START_TIMEOUT_S)
        await asyncio.wait_for(sending, 90)
    assert await _queue_depth(node.url, "outage.q") == 1


@pytest.mark.anyio
async def test_publish_during_outage_raises_after_timeout(node: PrivateBroker) -> None:
    async with Client(node.url, exchange="reconnect", publish_timeout_s=1.5) as client:
        await node.stop()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="publish_timeout_s"):
            await client.send("anything", {"x": 1})
        assert time.monotonic() - began < 30
