"""Tests of message outcomes against the real broker: bad input, retries, dead letters, redeliveries."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aio_pika
import anyio
import pytest
from aio_pika.abc import AbstractIncomingMessage
from anyio.streams.memory import MemoryObjectReceiveStream
from loguru import logger
from pydantic import BaseModel, Field

from sdk import Client, Context, Reject, RemoteError, Retry, Service, route
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import SettingsModel

if TYPE_CHECKING:
    from loguru import Record

Records = list["Record"]


class Order(BaseModel):
    item: str
    quantity: int = Field(gt=0)


@pytest.fixture
def sdk_logs() -> Iterator[Records]:
    """Turn on the SDK's log lines for one test and collect their records."""
    records: Records = []
    logger.enable("sdk")
    sink_id = logger.add(lambda message: records.append(message.record), level="DEBUG")
    try:
        yield records
    finally:
        logger.remove(sink_id)
        logger.disable("sdk")


def lines_with(records: Records, text: str) -> Records:
    return [record for record in records if text in record["message"]]


@asynccontextmanager
async def serving(mrq_settings: SettingsModel) -> AsyncIterator[Client]:
    """Serve the registered services and yield a client on the same exchange."""
    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        yield client


@asynccontextmanager
async def watch_queue(
    broker_url: str, queue_name: str
) -> AsyncIterator[MemoryObjectReceiveStream[AbstractIncomingMessage]]:
    """Consume a durable classic queue (declared as the SDK declares dead-letter queues) into a stream."""
    send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](1000)
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection, send, receive:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)

        async def forward(message: AbstractIncomingMessage) -> None:
            send.send_nowait(message)

        await queue.consume(forward, no_ack=True)
        yield receive


async def next_message(
    stream: MemoryObjectReceiveStream[AbstractIncomingMessage], timeout_s: float = 10
) -> AbstractIncomingMessage:
    with anyio.fail_after(timeout_s):
        return await stream.receive()


async def publish_raw(broker_url: str, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=routing_key, timeout=10)


async def dead_count(broker_url: str, queue_name: str) -> int:
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


# Bad input.


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_invalid_json_dead_lettered_once(
    mrq_settings: SettingsModel, broker_url: str, unique: str, sdk_logs: Records
) -> None:
    service = f"json{unique}"
    handled: list[Any] = []
    handled_event = anyio.Event()

    class Strict(Service):
        name = service

        @route("take")
        async def take(self, order: Order) -> None:
            handled.append(order)
            handled_event.set()

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.take.dead") as dead:
        broken = aio_pika.Message(b'{"item": "tea", ', content_type="application/json")
        await publish_raw(broker_url, mrq_settings.exchange, f"{service}.take", broken)
        letter = await next_message(dead)
        await client.send(f"{service}.take", {"item": "tea", "quantity": 1})
        with anyio.fail_after(10):
            await handled_event.wait()

    assert letter.body == b'{"item": "tea", '
    assert letter.headers["x-mrq-error-type"] == "BadMessage"
    assert str(letter.headers["x-mrq-error-reason"]).startswith("invalid JSON body")
    assert letter.headers["x-mrq-original-routing-key"] == f"{service}.take"
    assert handled == [Order(item="tea", quantity=1)]
    assert len(lines_with(sdk_logs, "bad message dead-lettered")) == 1


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_invalid_body_call_gets_field_errors(
    mrq_settings: SettingsModel, broker_url: str, unique: str, sdk_logs: Records
) -> None:
    service = f"valid{unique}"

    class Strict(Service):
        name = service

        @route("take")
        async def take(self, order: Order) -> int:
            return order.quantity

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.take.dead") as dead:
        with pytest.raises(RemoteError, match=r"raised BadMessage: invalid body: quantity: .*greater than 0"):
            await client.call(f"{service}.take", {"item": "tea", "quantity": 0}, timeout=10)
        with pytest.raises(RemoteError, match=r"raised BadMessage: invalid body: ") as caught:
            await client.call(f"{service}.take", {"quantity": "many"}, timeout=10)
        first_letter = await next_message(dead)
        second_letter = await next_message(dead)
        after = await client.call(f"{service}.take", {"item": "tea", "quantity": 3}, timeout=10)

    assert caught.value.type == "BadMessage"
    assert sorted(item["field"] for item in caught.value.errors) == ["item", "quantity"]
    assert "item: Field required" in caught.value.message
    assert "quantity" in str(first_letter.headers["x-mrq-error-reason"])
    assert first_letter.headers["x-mrq-error-type"] == "BadMessage"
    assert "item: Field required" in str(second_letter.headers["x-mrq-error-reason"])
    assert after == 3
    assert len(lines_with(sdk_logs, "bad message dead-lettered")) == 2


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_invalid_json_call_gets_remote_error(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"jsoncall{unique}"

    class Strict(Service):
        name = service

        async def handle(self, ctx: Context) -> Any:
            return ctx.body

    async with serving(mrq_settings), watch_queue(broker_url, f"{service}.dead") as dead:
        connection = await aio_pika.connect(broker_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue("amq.rabbitmq.reply-to", passive=True)
            received: list[AbstractIncomingMessage] = []
            replied = anyio.Event()

            async def keep(message: AbstractIncomingMessage) -> None:
                received.append(message)
                replied.set()

            await replies.consume(keep, no_ack=True)
            exchange = await channel.get_exchange(mrq_settings.exchange, ensure=False)
            request = aio_pika.Message(
                b"not json",
                content_type="application/json",
                reply_to="amq.rabbitmq.reply-to",
                correlation_id="c-1",
            )
            await exchange.publish(request, routing_key=service, timeout=10)
            with anyio.fail_after(10):
                await replied.wait()
        letter = await next_message(dead)

    reply = received[0]
    assert reply.headers["x-mrq-status"] == "error"
    assert reply.correlation_id == "c-1"
    assert b'"type":"BadMessage"' in reply.body
    assert b"invalid JSON body" in reply.body
    assert letter.body == b"not json"


# Retries and dead letters.


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_failing_handler_retried_then_dead_lettered(
    mrq_settings: SettingsModel, broker_url: str, unique: str, sdk_logs: Records
) -> None:
    service = f"retry{unique}"
    attempts: list[tuple[int, float]] = []
    message_ids: list[str | None] = []

    class Flaky(Service):
        name = service

        @route("work", retries=3, retry_delay_s=0.1)
        async def work(self, ctx: Context) -> None:
            attempts.append((ctx.attempt, time.monotonic()))
            message_ids.append(ctx.message.message_id)
            raise ValueError(f"boom on attempt {ctx.attempt}")

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.work.dead") as dead:
        await client.send(f"{service}.work", {"n": 1}, headers={"x-trace": "t-9"})
        letter = await next_message(dead, timeout_s=30)

    numbers = [number for number, _ in attempts]
    gaps_s = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(attempts)]
    headers = letter.headers
    assert numbers == [1, 2, 3, 4]
    assert gaps_s[0] >= 0.1 - 0.01
    assert gaps_s[1] >= 0.2 - 0.01
    assert gaps_s[2] >= 0.4 - 0.01
    assert letter.body == b'{"n":1}'
    assert message_ids[0]
    assert set(message_ids) == {letter.message_id}
    assert headers["x-trace"] == "t-9"
    assert headers["x-mrq-attempt"] == 4
    assert headers["x-mrq-error-type"] == "ValueError"
    assert headers["x-mrq-error-reason"] == "ValueError: boom on attempt 4"
    assert "Traceback (most recent call last)" in str(headers["x-mrq-error-message"])
    assert "boom on attempt 4" in str(headers["x-mrq-error-message"])
    assert headers["x-mrq-original-routing-key"] == f"{service}.work"
    assert service in str(headers["x-mrq-failed-by"])
    retried = lines_with(sdk_logs, "handler failed, retrying")
    gave_up = lines_with(sdk_logs, "message dead-lettered")
    assert len(retried) == 3
    assert len(gave_up) == 1
    assert [record["exception"] is not None for record in retried + gave_up] == [False] * 3 + [True]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_reject_dead_letters_at_once(mrq_settings: SettingsModel, broker_url: str, unique: str) -> None:
    service = f"reject{unique}"
    attempts: list[int] = []

    class Picky(Service):
        name = service

        @route("work", retries=5)
        async def work(self, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            raise Reject("customer is blocked")

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.work.dead") as dead:
        await client.send(f"{service}.work", "order-1")
        letter = await next_message(dead)

    assert attempts == [1]
    assert letter.body == b"order-1"
    assert letter.content_type == "text/plain"
    assert letter.headers["x-mrq-error-type"] == "Reject"
    assert letter.headers["x-mrq-error-reason"] == "customer is blocked"
    assert "x-mrq-error-message" not in letter.headers


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_reject_in_call_raises_remote_error(mrq_settings: SettingsModel, unique: str) -> None:
    class Picky(Service):
        name = f"rejcall{unique}"

        async def handle(self, ctx: Context) -> None:
            raise Reject("not today")

    async with serving(mrq_settings) as client:
        with pytest.raises(RemoteError, match=r"raised Reject: not today"):
            await client.call(f"rejcall{unique}", None, timeout=10)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_retry_comes_back_after_delay(mrq_settings: SettingsModel, unique: str) -> None:
    attempts: list[tuple[int, float]] = []
    second = anyio.Event()

    class Patient(Service):
        name = f"patient{unique}"

        async def handle(self, ctx: Context) -> None:
            attempts.append((ctx.attempt, time.monotonic()))
            if ctx.attempt == 1:
                raise Retry(delay_s=0.5, reason="stock not there yet")
            second.set()

    async with serving(mrq_settings) as client:
        await client.send(f"patient{unique}", None)
        with anyio.fail_after(10):
            await second.wait()

    assert [number for number, _ in attempts] == [1, 2]
    assert attempts[1][1] - attempts[0][1] >= 0.5 - 0.01


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_call_retried_until_answered(mrq_settings: SettingsModel, unique: str) -> None:
    attempts: list[int] = []

    class Patient(Service):
        name = f"patientcall{unique}"

        async def handle(self, ctx: Context) -> int:
            attempts.append(ctx.attempt)
            if ctx.attempt < 3:
                raise Retry(delay_s=0.05)
            return ctx.attempt

    async with serving(mrq_settings) as client:
        answer = await client.call(f"patientcall{unique}", None, timeout=10)

    assert answer == 3
    assert attempts == [1, 2, 3]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_call_out_of_retries_gets_error(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"hopeless{unique}"
    attempts: list[int] = []

    class Hopeless(Service):
        name = service

        @route("work", retries=1)
        async def work(self, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            raise Retry(delay_s=0.05, reason="still waiting")

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.work.dead") as dead:
        started = time.monotonic()
        with pytest.raises(RemoteError, match=r"raised Retry: still waiting"):
            await client.call(f"{service}.work", None, timeout=20)
        elapsed_s = time.monotonic() - started
        letter = await next_message(dead)

    assert attempts == [1, 2]
    assert elapsed_s < 10
    assert letter.headers["x-mrq-error-type"] == "Retry"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_failed_call_not_retried(mrq_settings: SettingsModel, broker_url: str, unique: str) -> None:
    service = f"callfail{unique}"
    attempts: list[int] = []

    class Failing(Service):
        name = service

        @route("work", retries=3)
        async def work(self, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            raise KeyError("missing")

    async with serving(mrq_settings) as client:
        with pytest.raises(RemoteError, match=r"raised KeyError: 'missing'"):
            await client.call(f"{service}.work", None, timeout=10)
        await anyio.sleep(0.5)

    assert attempts == [1]
    assert await dead_count(broker_url, f"{service}.work.dead") == 0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_poison_message_does_not_block_queue(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"poison{unique}"
    processed: list[int] = []
    processed_when_dead: list[int] = []

    class Worker(Service):
        name = service
        prefetch = 1
        concurrency = 1

        @route("work", retries=2, retry_delay_s=0.05)
        async def work(self, ctx: Context, number: int) -> None:
            if number < 0:
                raise RuntimeError("poison")
            processed.append(number)

    async with serving(mrq_settings) as client, watch_queue(broker_url, f"{service}.work.dead") as dead:
        for number in range(30):
            await client.send(f"{service}.work", number)
        await client.send(f"{service}.work", -1)
        for number in range(30, 60):
            await client.send(f"{service}.work", number)
        letter = await next_message(dead, timeout_s=30)
        processed_when_dead.extend(processed)

    assert letter.body == b"-1"
    assert letter.headers["x-mrq-attempt"] == 3
    assert sorted(processed_when_dead) == list(range(60))


# Restarts and redeliveries.


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_attempt_count_survives_restart(mrq_settings: SettingsModel, unique: str) -> None:
    service = f"restart{unique}"
    attempts: list[tuple[str, int]] = []
    phase = "first host"
    first_failed = anyio.Event()
    second_seen = anyio.Event()

    class Stubborn(Service):
        name = service

        @route("work", retries=5, retry_delay_s=1.0)
        async def work(self, ctx: Context) -> None:
            attempts.append((phase, ctx.attempt))
            if phase == "first host":
                first_failed.set()
                raise ConnectionError("downstream is down")
            second_seen.set()

    async with serving(mrq_settings) as client:
        await client.send(f"{service}.work", None)
        with anyio.fail_after(10):
            await first_failed.wait()

    phase = "second host"
    async with serving(mrq_settings):
        with anyio.fail_after(20):
            await second_seen.wait()

    assert attempts == [("first host", 1), ("second host", 2)]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_requeued_message_counts_redelivery(
    mrq_settings: SettingsModel, unique: str, sdk_logs: Records
) -> None:
    service = f"redeliver{unique}"
    seen: list[tuple[str, bool, Any, int]] = []
    phase = "first host"
    first_started = anyio.Event()
    second_seen = anyio.Event()

    class Slow(Service):
        name = service

        async def handle(self, ctx: Context) -> None:
            seen.append((phase, ctx.redelivered, ctx.headers.get("x-mrq-redeliveries"), ctx.attempt))
            if phase == "first host":
                first_started.set()
                await anyio.sleep(30)
            second_seen.set()

    host = ServiceHost(registry.specs(), mrq_settings)
    async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        await host.start()
        await client.send(service, "job")
        with anyio.fail_after(10):
            await first_started.wait()
        await host.stop(timeout_s=0.5)

    phase = "second host"
    async with serving(mrq_settings):
        with anyio.fail_after(20):
            await second_seen.wait()

    assert seen == [("first host", False, None, 1), ("second host", True, 1, 1)]
    assert len(lines_with(sdk_logs, "handler cancelled at the stop deadline")) == 1


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_too_many_redeliveries_dead_lettered(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"crashy{unique}"
    settings = mrq_settings.model_copy(update={"max_redeliveries": 0})
    calls: list[str] = []
    phase = "first host"
    first_started = anyio.Event()

    class Crashy(Service):
        name = service

        async def handle(self, ctx: Context) -> None:
            calls.append(phase)
            first_started.set()
            await anyio.sleep(30)

    host = ServiceHost(registry.specs(), settings)
    async with Client(settings.broker_url, exchange=settings.exchange) as client:
        await host.start()
        await client.send(service, "kills its consumer")
        with anyio.fail_after(10):
            await first_started.wait()
        await host.stop(timeout_s=0.5)

    phase = "second host"
    async with serving(settings), watch_queue(broker_url, f"{service}.dead") as dead:
        letter = await next_message(dead)

    assert calls == ["first host"]
    assert letter.body == b"kills its consumer"
    assert letter.headers["x-mrq-error-type"] == "Redelivered"
    assert "delivered 1 times without an ack" in str(letter.headers["x-mrq-error-reason"])
