"""Tests of sending, calling, handler contexts and flow control against the real broker."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import anyio
import anyio.from_thread
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel, Field

from sdk import (
    BrokerUnavailable,
    Client,
    Context,
    NoRoute,
    RemoteError,
    RpcTimeout,
    Service,
    TopologyError,
    on_event,
    route,
)
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import SettingsModel


class Line(BaseModel):
    item: str
    quantity: int = Field(gt=0)


class Receipt(BaseModel):
    items: int
    total: int


@asynccontextmanager
async def serving(mrq_settings: SettingsModel) -> AsyncIterator[Client]:
    """Serve the registered services and yield a client on the same exchange."""
    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        yield client


@asynccontextmanager
async def amqp_channel(broker_url: str) -> AsyncIterator[AbstractChannel]:
    """Open a plain aio-pika channel, for what the SDK does not do: raw bodies, foreign queues."""
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection:
        yield await connection.channel()


async def publish_raw(
    channel: AbstractChannel, exchange: str, routing_key: str, message: aio_pika.Message
) -> None:
    target = await channel.get_exchange(exchange, ensure=False)
    await target.publish(message, routing_key=routing_key, timeout=10)


async def queue_counts(vhost: str, queue: str) -> tuple[int, int]:
    """Return (ready, unacknowledged) message counts of a queue, as the broker reports them."""
    result = await anyio.run_process(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        check=True,
    )
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"queue {queue!r} not listed in vhost {vhost!r}: {result.stdout.decode()!r}")


# Context.


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_context_fields_and_body_decoding(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"ctx{unique}"
    seen: dict[str, dict[str, Any]] = {}
    all_seen = anyio.Event()

    class Inspect(Service):
        name = service

        @route("look")
        async def look(self, ctx: Context) -> None:
            seen[ctx.correlation_id or ""] = {
                "body": ctx.body,
                "trace": ctx.headers.get("x-trace"),
                "message": ctx.message,
                "service": ctx.service,
                "route": ctx.route,
                "routing_key": ctx.routing_key,
                "redelivered": ctx.redelivered,
                "attempt": ctx.attempt,
            }
            if len(seen) == 4:
                all_seen.set()

    bodies = [
        ("json", b'{"a": [1, 2]}', "application/json"),
        ("text", "héllo".encode(), "text/plain; charset=utf-8"),
        ("binary", b"\x00\xff", "application/octet-stream"),
        ("image", b"\x89PNG", "image/png"),
    ]
    async with serving(mrq_settings), amqp_channel(broker_url) as channel:
        for correlation_id, data, content_type in bodies:
            message = aio_pika.Message(
                data, content_type=content_type, correlation_id=correlation_id, headers={"x-trace": "t-1"}
            )
            await publish_raw(channel, mrq_settings.exchange, f"{service}.look", message)
        with anyio.fail_after(10):
            await all_seen.wait()

    assert seen["json"]["body"] == {"a": [1, 2]}
    assert seen["text"]["body"] == "héllo"
    assert seen["binary"]["body"] == b"\x00\xff"
    assert seen["image"]["body"] == b"\x89PNG"
    first = seen["json"]
    assert first["trace"] == "t-1"
    assert isinstance(first["message"], aio_pika.IncomingMessage)
    assert first["message"].body == b'{"a": [1, 2]}'
    assert first["service"] == service
    assert first["route"] == "look"
    assert first["routing_key"] == f"{service}.look"
    assert first["redelivered"] is False
    assert first["attempt"] == 1


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_call_sets_correlation_id(mrq_settings: SettingsModel, unique: str) -> None:
    class Echo(Service):
        name = f"corr{unique}"

        async def handle(self, ctx: Context) -> Any:
            return {"correlation_id": ctx.correlation_id, "reply_to": ctx.reply_to}

    async with serving(mrq_settings) as client:
        first = await client.call(f"corr{unique}", None, timeout=10)
        second = await client.call(f"corr{unique}", None, timeout=10)

    assert first["correlation_id"]
    assert first["correlation_id"] != second["correlation_id"]
    assert first["reply_to"].startswith("amq.rabbitmq.reply-to")


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_handler_sends_calls_and_emits(mrq_settings: SettingsModel, unique: str) -> None:
    notes: list[Any] = []
    events: list[Any] = []
    noted = anyio.Event()
    announced = anyio.Event()

    class Relay(Service):
        name = f"relay{unique}"

        @route("run")
        async def run(self, ctx: Context, number: int) -> int:
            doubled: int = await ctx.call(f"math{unique}.double", number, timeout=10)
            await ctx.send(f"math{unique}.note", {"doubled": doubled}, headers={"x-from": "relay"})
            await ctx.emit("relay.done", doubled)
            return doubled

    class Math(Service):
        name = f"math{unique}"

        @route("double")
        async def double(self, number: int) -> int:
            return 2 * number

        @route("note")
        async def note(self, ctx: Context) -> None:
            notes.append((ctx.body, ctx.headers.get("x-from")))
            noted.set()

        @on_event("relay.*")
        async def on_relay(self, ctx: Context) -> None:
            events.append((ctx.routing_key, ctx.body))
            announced.set()

    async with serving(mrq_settings) as client:
        result = await client.call(f"relay{unique}.run", 21, timeout=10)
        with anyio.fail_after(10):
            await noted.wait()
            await announced.wait()

    assert result == 42
    assert notes == [({"doubled": 42}, "relay")]
    assert events == [("event.relay.done", 42)]


# Typed bodies and RPC outcomes.


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_typed_body_validated_into_model(mrq_settings: SettingsModel, unique: str) -> None:
    class Shop(Service):
        name = f"shop{unique}"

        @route("total")
        async def total(self, lines: list[Line]) -> Receipt:
            assert all(isinstance(line, Line) for line in lines)
            return Receipt(items=len(lines), total=sum(line.quantity for line in lines))

    async with serving(mrq_settings) as client:
        receipt = await client.call(
            f"shop{unique}.total", [{"item": "tea", "quantity": 2}, Line(item="jam", quantity=3)], timeout=10
        )

    assert receipt == {"items": 2, "total": 5}


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_unroutable_send_raises_no_route_at_once(mrq_settings: SettingsModel, unique: str) -> None:
    async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        started = time.monotonic()
        with pytest.raises(NoRoute, match=rf"no queue is bound to 'nobody{unique}\.x' on exchange"):
            await client.send(f"nobody{unique}.x", {"a": 1})
        elapsed_s = time.monotonic() - started

    assert elapsed_s < 2.0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_unroutable_call_raises_no_route_at_once(mrq_settings: SettingsModel, unique: str) -> None:
    async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        started = time.monotonic()
        with pytest.raises(NoRoute, match=rf"no queue is bound to 'nobody{unique}'"):
            await client.call(f"nobody{unique}", None, timeout=20)
        elapsed_s = time.monotonic() - started

    assert elapsed_s < 2.0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_emit_without_subscriber_is_dropped(mrq_settings: SettingsModel, unique: str) -> None:
    async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        await client.emit(f"nobody{unique}.happened", {"a": 1})


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_slow_reply_raises_rpc_timeout(mrq_settings: SettingsModel, unique: str) -> None:
    release = anyio.Event()

    class Sleepy(Service):
        name = f"sleepy{unique}"

        async def handle(self, ctx: Context) -> str:
            with anyio.move_on_after(10):
                await release.wait()
            return "late"

    async with serving(mrq_settings) as client:
        started = time.monotonic()
        with pytest.raises(RpcTimeout, match=r"within 0\.5 s; the request may still be processed") as caught:
            await client.call(f"sleepy{unique}", None, timeout=0.5)
        elapsed_s = time.monotonic() - started
        release.set()

    assert isinstance(caught.value, TimeoutError)
    assert caught.value.target == f"sleepy{unique}"
    assert 0.5 <= elapsed_s < 5.0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_remote_exception_raises_remote_error(mrq_settings: SettingsModel, unique: str) -> None:
    class Fragile(Service):
        name = f"fragile{unique}"

        @route("divide")
        async def divide(self, numbers: list[int]) -> float:
            if numbers[1] == 0:
                raise ValueError(f"cannot divide {numbers[0]} by zero")
            return numbers[0] / numbers[1]

    async with serving(mrq_settings) as client:
        with pytest.raises(RemoteError, match=rf"fragile{unique}\.divide raised ValueError") as caught:
            await client.call(f"fragile{unique}.divide", [7, 0], timeout=10)
        after = await client.call(f"fragile{unique}.divide", [8, 2], timeout=10)

    assert caught.value.type == "ValueError"
    assert caught.value.message == "cannot divide 7 by zero"
    assert caught.value.target == f"fragile{unique}.divide"
    assert after == 4.0


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_unencodable_reply_raises_remote_type_error(mrq_settings: SettingsModel, unique: str) -> None:
    class Odd(Service):
        name = f"odd{unique}"

        async def handle(self, ctx: Context) -> object:
            return object()

    async with serving(mrq_settings) as client:
        with pytest.raises(RemoteError, match=r"raised TypeError: cannot encode the reply"):
            await client.call(f"odd{unique}", None, timeout=10)


# Prefetch, concurrency and blocking handlers.


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_concurrency_limits_running_handlers(mrq_settings: SettingsModel, unique: str) -> None:
    running = 0
    max_running = 0
    finished = 0
    all_done = anyio.Event()

    class Limited(Service):
        name = f"limited{unique}"
        concurrency = 2

        async def handle(self, ctx: Context) -> None:
            nonlocal running, max_running, finished
            running += 1
            max_running = max(max_running, running)
            await anyio.sleep(0.05)
            running -= 1
            finished += 1
            if finished == 12:
                all_done.set()

    async with serving(mrq_settings) as client:
        for number in range(12):
            await client.send(f"limited{unique}", number)
        with anyio.fail_after(30):
            await all_done.wait()

    assert max_running == 2


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_prefetch_limits_deliveries(mrq_settings: SettingsModel, unique: str, test_vhost: str) -> None:
    started = 0
    three_started = anyio.Event()
    release = anyio.Event()
    finished = 0
    all_done = anyio.Event()

    class Fetchy(Service):
        name = f"fetchy{unique}"
        prefetch = 3
        concurrency = 20

        async def handle(self, ctx: Context) -> None:
            nonlocal started, finished
            started += 1
            if started == 3:
                three_started.set()
            with anyio.fail_after(30):
                await release.wait()
            finished += 1
            if finished == 10:
                all_done.set()

    async with serving(mrq_settings) as client:
        for number in range(10):
            await client.send(f"fetchy{unique}", number)
        with anyio.fail_after(10):
            await three_started.wait()
        await anyio.sleep(0.5)
        started_while_blocked = started
        counts = await queue_counts(test_vhost, f"fetchy{unique}")
        release.set()
        with anyio.fail_after(30):
            await all_done.wait()

    assert started_while_blocked == 3
    assert counts == (7, 3)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_blocking_handler_runs_in_thread(mrq_settings: SettingsModel, unique: str) -> None:
    loop_thread = threading.get_ident()
    handler_threads: list[int] = []
    slow_started = anyio.Event()
    release = threading.Event()

    class Mixed(Service):
        name = f"mixed{unique}"

        @route("slow", blocking=True)
        def slow(self, ctx: Context) -> str:
            handler_threads.append(threading.get_ident())
            anyio.from_thread.run_sync(slow_started.set)
            release.wait(20)
            return "slow done"

        @route("fast")
        async def fast(self, ctx: Context) -> str:
            return "fast"

    async with serving(mrq_settings) as client, anyio.create_task_group() as group:
        slow_results: list[str] = []

        async def call_slow() -> None:
            slow_results.append(await client.call(f"mixed{unique}.slow", None, timeout=30))

        group.start_soon(call_slow)
        with anyio.fail_after(10):
            await slow_started.wait()
        fast_results = [await client.call(f"mixed{unique}.fast", None, timeout=3) for _ in range(3)]
        slow_still_running = not slow_results
        release.set()

    assert fast_results == ["fast", "fast", "fast"]
    assert slow_still_running
    assert slow_results == ["slow done"]
    assert handler_threads != [loop_thread]
    assert len(handler_threads) == 1


# Topology and acknowledgements.


async def start_topo_service(mrq_settings: SettingsModel, broker_url: str, service: str) -> None:
    """Declare `<service>.work` as a quorum queue, then start a classic service that consumes it."""

    class Topo(Service):
        name = service

        @route("work")
        async def work(self, ctx: Context) -> None:
            return None

    async with amqp_channel(broker_url) as channel:
        await channel.declare_queue(f"{service}.work", durable=True, arguments={"x-queue-type": "quorum"})

    await ServiceHost(registry.specs(), mrq_settings).start()


def find_error(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """Return `error` or the first exception of type `kind` nested in an exception group."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := find_error(inner, kind)) is not None:
                return found
    return None


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_queue_mismatch_names_argument(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"topo{unique}"

    with pytest.raises(BaseException) as caught:  # noqa: PT011 - the type is checked below
        await start_topo_service(mrq_settings, broker_url, service)
    error = find_error(caught.value, TopologyError)

    assert isinstance(error, TopologyError), f"expected a TopologyError, got {caught.value!r}"
    assert error.kind == "queue"
    assert error.name == f"{service}.work"
    assert "argument x-queue-type" in error.detail
    assert "quorum" in error.detail
    assert "delete the queue or change the setting" in str(error)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_queue_mismatch_raises_topology_error(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"topo{unique}"

    with pytest.raises(TopologyError, match=rf"queue '{service}\.work' already exists with other arguments"):
        await start_topo_service(mrq_settings, broker_url, service)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_unreachable_broker_raises_broker_unavailable() -> None:
    client = Client("amqp://guest:secret@127.0.0.1:1/", connect_timeout_s=5)

    with pytest.raises(
        BrokerUnavailable, match=r"cannot connect to the broker at amqp://guest:\*\*\*@127"
    ) as caught:
        await client.connect()

    assert "secret" not in str(caught.value)


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_batched_acks_settle_burst_exactly_once(
    mrq_settings: SettingsModel, broker_url: str, unique: str, test_vhost: str
) -> None:
    total = 500
    service = f"burst{unique}"
    seen: list[int] = []
    all_seen = anyio.Event()
    rng = random.Random(7)

    class Burst(Service):
        name = service
        prefetch = 64
        concurrency = 64

        async def handle(self, number: int) -> None:
            await anyio.sleep(rng.uniform(0, 0.01))
            seen.append(number)
            if len(seen) == total:
                all_seen.set()

    async with serving(mrq_settings) as client:
        for number in range(total):
            await client.send(service, number)
        with anyio.fail_after(60):
            await all_seen.wait()
        # The last acks go out just after the last handler returns: poll the broker's counts.
        for _ in range(50):
            counts = await queue_counts(test_vhost, service)
            if counts == (0, 0):
                break
            await anyio.sleep(0.2)

    assert counts == (0, 0)
    assert sorted(seen) == list(range(total))
    assert max(Counter(seen).values()) == 1
    assert seen != sorted(seen)
    async with amqp_channel(broker_url) as channel:
        queue = await channel.declare_queue(service, passive=True)
        assert queue.declaration_result.message_count == 0
        leftovers: list[AbstractIncomingMessage] = []

        async def keep(message: AbstractIncomingMessage) -> None:
            leftovers.append(message)

        tag = await queue.consume(keep, no_ack=True)
        await anyio.sleep(0.5)
        await queue.cancel(tag)
    assert leftovers == []
