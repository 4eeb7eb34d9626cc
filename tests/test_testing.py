"""TestBroker's own API: settle, dead_letters, queue, published, delays and service selection.

These tests need no RabbitMQ; tests/test_parity.py checks that TestBroker
gives the same outcomes as the real broker.
"""

import asyncio
import datetime
import time
from typing import Any

import anyio
import pytest

from sdk import (
    Context,
    DefinitionError,
    NoRoute,
    RemoteError,
    Retry,
    RpcTimeout,
    Service,
    TopologyError,
    microservice,
    names,
    on_event,
    route,
)
from sdk.testing import QueueNotFound, SettleTimeout, TestBroker, topic_matches

pytestmark = pytest.mark.anyio


class Calls:
    """Values recorded by handlers, in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        self.items.append(item)


@pytest.mark.timeout(20)
async def test_settle_fast_forwards_long_retry_delays() -> None:
    calls = Calls()

    class Mail(Service):
        name = "mail"

        @route("send")
        async def send(self, ctx: Context) -> None:
            calls.add(ctx.attempt)
            if ctx.attempt < 3:
                raise Retry(delay_s=3600)

    started = time.monotonic()
    async with TestBroker() as broker:
        await broker.send("mail.send", {"to": "a@example.org"})
        await broker.settle()

        assert calls.items == [1, 2, 3]
        assert broker.dead_letters("mail.send") == []
    assert time.monotonic() - started < 10


@pytest.mark.timeout(20)
async def test_real_delays_honour_a_short_retry_delay() -> None:
    seen_at: list[float] = []

    class Mail(Service):
        name = "mail"

        @route("send")
        async def send(self, ctx: Context) -> None:
            seen_at.append(time.monotonic())
            if ctx.attempt == 1:
                raise Retry(delay_s=0.3)

    async with TestBroker(real_delays=True) as broker:
        await broker.send("mail.send", {})
        await broker.settle()

    assert len(seen_at) == 2
    assert seen_at[1] - seen_at[0] >= 0.3


@pytest.mark.timeout(20)
async def test_real_delays_leave_long_delay_waiting() -> None:
    class Mail(Service):
        name = "mail"

        @route("send")
        async def send(self, ctx: Context) -> None:
            if ctx.attempt == 1:
                raise Retry(delay_s=3600)

    async with TestBroker(real_delays=True, retry_delay_max_s=7200) as broker:
        await broker.send("mail.send", {"to": "c@example.org"})
        with pytest.raises(SettleTimeout, match=r"waiting for a TTL in mail\.send\.retry\.3600000"):
            await broker.settle(timeout_s=0.5)

        waiting = broker.queue("mail.send.retry.3600000")
        assert [m.body for m in waiting] == [{"to": "c@example.org"}]
        assert waiting[0].headers[names.H_ATTEMPT] == 2


@pytest.mark.timeout(20)
async def test_dead_letters_carry_error_headers() -> None:
    class Mail(Service):
        name = "mail"

        @route("send", retries=1)
        async def send(self, body: dict[str, Any]) -> None:
            raise ValueError(f"bad address {body['to']}")

    async with TestBroker(retry_delay_s=5) as broker:
        await broker.send("mail.send", {"to": "nobody"})
        await broker.settle()
        letters = broker.dead_letters("mail.send")

    assert len(letters) == 1
    letter = letters[0]
    assert letter.body == {"to": "nobody"}
    assert letter.raw_body == b'{"to":"nobody"}'
    assert letter.headers[names.H_ATTEMPT] == 2
    assert letter.headers[names.H_ERROR_TYPE] == "ValueError"
    assert letter.headers[names.H_ERROR_REASON] == "ValueError: bad address nobody"
    assert "ValueError: bad address nobody" in letter.headers[names.H_ERROR_MESSAGE]
    assert letter.headers[names.H_ORIGINAL_ROUTING_KEY] == "mail.send"
    assert [d["queue"] for d in letter.headers["x-death"]] == ["mail.send.retry.5000"]


@pytest.mark.timeout(20)
async def test_published_lists_publishes_in_order() -> None:
    class Billing(Service):
        name = "billing"

        @route("charge")
        async def charge(self, ctx: Context, body: dict[str, int]) -> int:
            await ctx.emit("charged", {"amount": body["amount"]})
            return body["amount"] * 2

    async with TestBroker(exchange="shop") as broker:
        assert await broker.call("billing.charge", {"amount": 4}, headers={"x-trace": "t1"}) == 8
        await broker.settle()
        published = broker.published

    request, event, reply = published
    assert (request.exchange, request.routing_key, request.body) == ("shop", "billing.charge", {"amount": 4})
    assert request.headers == {"x-trace": "t1"}
    assert request.queues == ("billing.charge",)
    assert request.mandatory
    assert (event.exchange, event.routing_key, event.body) == ("shop", "event.charged", {"amount": 4})
    assert event.queues == ()
    assert not event.mandatory
    assert reply.exchange == ""
    assert reply.routing_key == request.reply_to
    assert reply.correlation_id == request.correlation_id
    assert reply.headers == {names.H_STATUS: names.STATUS_OK}
    assert reply.body == 8


@pytest.mark.timeout(20)
async def test_handler_calls_reach_other_services() -> None:
    class Billing(Service):
        name = "billing"

        @route("quote")
        async def quote(self, body: dict[str, int]) -> int:
            return body["items"] * 3

    class Orders(Service):
        name = "orders"

        @route("create")
        async def create(self, ctx: Context, body: dict[str, int]) -> dict[str, int]:
            total = await ctx.call("billing.quote", {"items": body["items"]})
            await ctx.send("orders.audit", {"total": total})
            return {"total": total}

        @route("audit")
        async def audit(self, body: dict[str, int]) -> None:
            if body["total"] > 5:
                raise ValueError("total over limit")

    async with TestBroker(retries=0) as broker:
        assert await broker.call("orders.create", {"items": 2}) == {"total": 6}
        await broker.settle()

        assert [letter.body for letter in broker.dead_letters("orders.audit")] == [{"total": 6}]


@pytest.mark.timeout(20)
async def test_remote_error_and_no_route_like_client() -> None:
    @microservice("charge", service="billing")
    def charge(body: Any) -> None:
        raise KeyError("card")

    async with TestBroker() as broker:
        with pytest.raises(RemoteError, match=r"billing\.charge raised KeyError: 'card'"):
            await broker.call("billing.charge", {})
        with pytest.raises(NoRoute, match=r"no queue is bound to 'billing\.refund' on exchange 'mrq'"):
            await broker.send("billing.refund", {})
        await broker.emit("nobody.listens", {})


@pytest.mark.timeout(20)
async def test_services_selected_by_class_or_name() -> None:
    class Billing(Service):
        name = "billing"

        @route("charge")
        async def charge(self) -> str:
            return "billing"

    class Orders(Service):
        name = "orders"

        @route("create")
        async def create(self) -> str:
            return "orders"

    async with TestBroker(Billing) as broker:
        assert await broker.call("billing.charge") == "billing"
        with pytest.raises(NoRoute, match=r"orders\.create"):
            await broker.call("orders.create")

    async with TestBroker(services=["orders"]) as broker:
        assert await broker.call("orders.create") == "orders"
        with pytest.raises(NoRoute, match=r"billing\.charge"):
            await broker.call("billing.charge")

    with pytest.raises(DefinitionError, match=r"no registered service named shipping; registered"):
        TestBroker(services=["shipping"])


@pytest.mark.timeout(20)
async def test_settle_times_out_on_a_hanging_handler() -> None:
    class Reports(Service):
        name = "reports"

        @route("build")
        async def build(self) -> None:
            await asyncio.sleep(3600)

    async with TestBroker(stop_timeout_s=0.2) as broker:
        await broker.send("reports.build", {})
        with pytest.raises(SettleTimeout, match=r"unacked reports\.build=1"):
            await broker.settle(timeout_s=0.5)


@pytest.mark.timeout(20)
async def test_stop_requeues_unfinished_deliveries_as_redelivered() -> None:
    class Reports(Service):
        name = "reports"

        @route("build")
        async def build(self) -> None:
            await asyncio.sleep(3600)

    async with TestBroker(stop_timeout_s=0.2) as broker:
        await broker.send("reports.build", {"id": 1})
        with pytest.raises(SettleTimeout):
            await broker.settle(timeout_s=0.3)

    waiting = broker.queue("reports.build")
    assert [m.body for m in waiting] == [{"id": 1}]
    assert waiting[0].redelivered


@pytest.mark.timeout(20)
async def test_concurrency_limit_caps_running_handlers() -> None:
    running = 0
    peak = 0

    class Images(Service):
        name = "images"
        concurrency = 2

        @route("resize")
        async def resize(self) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    async with TestBroker() as broker:
        for _ in range(6):
            await broker.send("images.resize", {})
        await broker.settle()

    assert peak == 2


@pytest.mark.timeout(20)
async def test_event_patterns_route_like_topic_exchange() -> None:
    calls = Calls()

    class Audit(Service):
        name = "audit"

        @on_event("order.*")
        async def one_word(self, ctx: Context) -> None:
            calls.add(("order.*", ctx.routing_key))

        @on_event("order.#")
        async def any_words(self, ctx: Context) -> None:
            calls.add(("order.#", ctx.routing_key))

    async with TestBroker() as broker:
        for event in ("order", "order.created", "order.created.eu", "invoice.created"):
            await broker.emit(event, {})
        await broker.settle()

    assert sorted(calls.items) == [
        ("order.#", "event.order"),
        ("order.#", "event.order.created"),
        ("order.#", "event.order.created.eu"),
        ("order.*", "event.order.created"),
    ]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "a.b", True),
        ("#.c", "a.b.c", True),
        ("#.c", "a.b", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.*.c", "a.c", False),
    ],
)
@pytest.mark.timeout(5)
def test_topic_matches(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


@pytest.mark.timeout(20)
async def test_queue_redeclared_differently_raises() -> None:
    class Billing(Service):
        name = "billing"

        @route("charge")
        async def charge(self) -> None:
            pass

    async with TestBroker() as broker:
        transport = broker.messenger.broker
        with pytest.raises(TopologyError, match=r"queue 'billing\.charge'.*x-queue-type"):
            await transport.declare_queue(
                transport.publisher, "billing.charge", arguments={"x-queue-type": "quorum"}
            )


@pytest.mark.timeout(20)
async def test_queue_of_unknown_name_raises() -> None:
    class Billing(Service):
        name = "billing"

        @route("charge")
        async def charge(self) -> None:
            pass

    async with TestBroker() as broker:
        with pytest.raises(
            QueueNotFound, match=r"no queue named 'billing\.charg\.dead'.*billing\.charge\.dead"
        ):
            broker.dead_letters("billing.charg")


@pytest.mark.timeout(20)
async def test_expired_call_dropped_from_busy_queue() -> None:
    calls = Calls()
    first_started = anyio.Event()

    class Reports(Service):
        name = "reports"
        concurrency = 1
        prefetch = 1

        @route("build")
        async def build(self, body: int) -> int:
            calls.add(body)
            first_started.set()
            await asyncio.sleep(0.5)
            return body

    replies: list[int] = []

    async def call_first(broker: TestBroker) -> None:
        replies.append(await broker.call("reports.build", 1, timeout=5))

    async with TestBroker() as broker:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call_first, broker)
            await first_started.wait()
            with pytest.raises(RpcTimeout, match=r"no reply from 'reports\.build' within 0\.1 s"):
                await broker.call("reports.build", 2, timeout=0.1)
        await broker.settle()

    # The second request expired in the queue while the first used the only prefetch slot.
    assert replies == [1]
    assert calls.items == [1]
    assert broker.queue("reports.build") == []


@pytest.mark.timeout(20)
async def test_headers_pass_through_amqp_encoding() -> None:
    calls = Calls()

    class Inbox(Service):
        name = "inbox"

        @route("put")
        async def put(self, ctx: Context) -> None:
            calls.add(ctx.headers["x-app-at"])

    sent_at = datetime.datetime(2024, 5, 1, 12, 30, 15, 999, tzinfo=datetime.UTC)
    async with TestBroker() as broker:
        await broker.send("inbox.put", {}, headers={"x-app-at": sent_at})
        await broker.settle()
        with pytest.raises(ValueError, match="header 'x-app-tags' has type tuple"):
            await broker.send("inbox.put", {}, headers={"x-app-tags": ("a", "b")})

    # An AMQP timestamp has whole seconds.
    assert calls.items == [sent_at.replace(microsecond=0)]


@pytest.mark.timeout(20)
async def test_body_exception_propagates_unwrapped() -> None:
    class Billing(Service):
        name = "billing"

        @route("charge")
        async def charge(self) -> None:
            pass

    with pytest.raises(LookupError, match="raised in the test body"):
        async with TestBroker():
            raise LookupError("raised in the test body")
