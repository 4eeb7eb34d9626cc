"""The same scenarios on RabbitMQ and on TestBroker give the same outcome.

Each scenario defines its services, runs them on one backend and returns what
a user can observe: replies, errors, what handlers saw and the dead letters,
with ids and times stripped. Every scenario runs on both backends in one test,
which asserts that both outcomes equal the expected one.
"""

import asyncio
import datetime
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import anyio
import pytest
from pydantic import BaseModel

from sdk import (
    Client,
    Context,
    NoRoute,
    Reject,
    RemoteError,
    RpcTimeout,
    Service,
    codec,
    microservice,
    names,
    on_event,
    route,
)
from sdk.errors import BadMessage
from sdk.messenger import Messenger
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import settings
from sdk.testing import TestBroker

SETTLE_TIMEOUT_S = 30.0
BACKENDS = ("rabbitmq", "testbroker")


class Charge(BaseModel):
    amount: int
    currency: str = "EUR"


class Recorder:
    """What handlers saw, with a wake-up on every addition so that waiting needs no polling."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._added = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._added.set()
        self._added = asyncio.Event()

    async def wait_until(self, done: Callable[[list[Any]], bool]) -> None:
        while not done(self.items):
            await self._added.wait()


@dataclass
class DeadLetter:
    body: Any
    headers: dict[str, Any]


class RabbitBackend:
    """Services in a ServiceHost on the session's RabbitMQ virtual host, reached through a Client."""

    def __init__(self, host: ServiceHost, client: Client, recorder: Recorder) -> None:
        self.host = host
        self.client = client
        self.messenger: Messenger = client.messenger
        self.recorder = recorder

    async def settle(self, done: Callable[[list[Any]], bool]) -> None:
        with anyio.fail_after(SETTLE_TIMEOUT_S):
            await self.recorder.wait_until(done)
            for runner in self.host.runners:
                await runner.idle.wait()

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        channel = await self.client.broker.channel()
        try:
            dead = await channel.declare_queue(names.dead_queue(queue), passive=True)
            found = []
            while (message := await dead.get(no_ack=True, fail=False)) is not None:
                found.append(DeadLetter(_decode(message), dict(message.headers or {})))
            return found
        finally:
            await channel.close()


class MemoryBackend:
    """The same services on a TestBroker."""

    def __init__(self, broker: TestBroker, recorder: Recorder) -> None:
        self.broker = broker
        self.messenger: Messenger = broker.messenger
        self.recorder = recorder

    async def settle(self, done: Callable[[list[Any]], bool]) -> None:
        await self.broker.settle(SETTLE_TIMEOUT_S)
        assert done(self.recorder.items), f"settled, but the handlers saw only {self.recorder.items}"

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        return [DeadLetter(m.body, m.headers) for m in self.broker.dead_letters(queue)]


Backend = RabbitBackend | MemoryBackend


def _decode(message: aio_pika.abc.AbstractIncomingMessage) -> Any:
    try:
        return codec.decode(message.body, message.content_type)
    except BadMessage:
        return message.body


class Env:
    """One run of a scenario: names, the recorder and the backend to serve on."""

    def __init__(self, kind: str, unique: str, overrides: dict[str, Any]) -> None:
        self.kind = kind
        self.unique = unique
        self.overrides = overrides
        self.recorder = Recorder()

    def name(self, base: str) -> str:
        return f"{base}{self.unique}"

    def record(self, item: Any) -> None:
        self.recorder.add(item)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Backend]:
        if self.kind == "rabbitmq":
            resolved = settings.resolve(**self.overrides)
            async with ServiceHost(registry.specs(), resolved) as host, Client(**self.overrides) as client:
                yield RabbitBackend(host, client, self.recorder)
        else:
            async with TestBroker(**self.overrides) as broker:
                yield MemoryBackend(broker, self.recorder)


def error_outcome(exc: Exception) -> dict[str, Any]:
    outcome: dict[str, Any] = {"raised": type(exc).__name__, "text": str(exc)}
    if isinstance(exc, RemoteError):
        outcome.update(type=exc.type, message=exc.message, errors=exc.errors)
    return outcome


def dead_letter_outcome(letter: DeadLetter) -> dict[str, Any]:
    """Normalise a dead letter: keep what mrq promises, drop times, pids and tracebacks' frames."""
    headers = letter.headers
    trace = headers.get(names.H_ERROR_MESSAGE)
    deaths = [
        (d["queue"], d["reason"], d["count"], d["exchange"], tuple(d["routing-keys"]))
        for d in headers.get("x-death", [])
    ]
    return {
        "body": letter.body,
        "attempt": headers.get(names.H_ATTEMPT),
        "error_type": headers.get(names.H_ERROR_TYPE),
        "error_reason": headers.get(names.H_ERROR_REASON),
        "trace_last_line": trace.strip().splitlines()[-1] if trace else None,
        "original_routing_key": headers.get(names.H_ORIGINAL_ROUTING_KEY),
        "failed_by_service": str(headers.get(names.H_FAILED_BY, "")).split("/")[1],
        "failed_at_type": type(headers.get(names.H_FAILED_AT)).__name__,
        "deaths": deaths,
        "first_death": (headers.get("x-first-death-queue"), headers.get("x-first-death-reason")),
    }


def dead(
    queue: str,
    body: Any,
    error_type: str,
    reason: str,
    *,
    attempt: int | None = None,
    trace_last_line: str | None = None,
    deaths: list[tuple[str, str, int, str, tuple[str, ...]]] | None = None,
    service: str,
) -> dict[str, Any]:
    """The expected normalised dead letter."""
    deaths = deaths or []
    return {
        "body": body,
        "attempt": attempt,
        "error_type": error_type,
        "error_reason": reason,
        "trace_last_line": trace_last_line,
        "original_routing_key": queue,
        "failed_by_service": service,
        "failed_at_type": "int",
        "deaths": deaths,
        "first_death": (deaths[-1][0], "expired") if deaths else (None, None),
    }


# Scenarios. Each returns (outcome, expected outcome).

Outcome = tuple[Any, Any]


async def rpc_reply(env: Env) -> Outcome:
    billing = env.name("billing")

    class Billing(Service):
        name = billing

        @route("charge")
        async def charge(self, ctx: Context, body: Charge) -> dict[str, Any]:
            reply_to = ctx.reply_to or ""
            env.record(
                (ctx.attempt, reply_to.startswith(names.DIRECT_REPLY_TO + "."), bool(ctx.correlation_id))
            )
            return {"total": body.amount * 2, "currency": body.currency}

    async with env.serve() as backend:
        reply = await backend.messenger.call(f"{billing}.charge", {"amount": 21})
        await backend.settle(lambda items: len(items) == 1)
        letters = await backend.dead_letters(f"{billing}.charge")
    outcome = {"reply": reply, "seen": env.recorder.items, "dead": letters}
    return outcome, {"reply": {"total": 42, "currency": "EUR"}, "seen": [(1, True, True)], "dead": []}


async def remote_error(env: Env) -> Outcome:
    billing = env.name("billing")

    class Billing(Service):
        name = billing

        @route("charge")
        async def charge(self, body: Charge) -> None:
            env.record(body.amount)
            raise ValueError(f"card declined for amount {body.amount}")

    async with env.serve() as backend:
        with pytest.raises(RemoteError, match="card declined") as raised:
            await backend.messenger.call(f"{billing}.charge", {"amount": 5})
        await backend.settle(lambda items: len(items) == 1)
        letters = await backend.dead_letters(f"{billing}.charge")
    outcome = {"error": error_outcome(raised.value), "seen": env.recorder.items, "dead": letters}
    expected = {
        "error": {
            "raised": "RemoteError",
            "text": f"{billing}.charge raised ValueError: card declined for amount 5",
            "type": "ValueError",
            "message": "card declined for amount 5",
            "errors": [],
        },
        "seen": [5],
        "dead": [],
    }
    return outcome, expected


async def validation_failure(env: Env) -> Outcome:
    billing = env.name("billing")

    class Billing(Service):
        name = billing

        @route("charge")
        async def charge(self, body: Charge) -> None:
            env.record(body.amount)

    async with env.serve() as backend:
        with pytest.raises(RemoteError, match="amount") as raised:
            await backend.messenger.call(f"{billing}.charge", {"amount": "lots"})
        await backend.settle(lambda items: True)
        letters = await backend.dead_letters(f"{billing}.charge")
    problem = "Input should be a valid integer, unable to parse string as an integer"
    outcome = {
        "error": error_outcome(raised.value),
        "seen": env.recorder.items,
        "dead": [dead_letter_outcome(letter) for letter in letters],
    }
    expected = {
        "error": {
            "raised": "RemoteError",
            "text": f"{billing}.charge raised BadMessage: invalid body: amount: {problem}",
            "type": "BadMessage",
            "message": f"invalid body: amount: {problem}",
            "errors": [{"field": "amount", "message": problem}],
        },
        "seen": [],
        "dead": [
            dead(
                f"{billing}.charge",
                {"amount": "lots"},
                "BadMessage",
                f"invalid body: amount: {problem}",
                service=billing,
            )
        ],
    }
    return outcome, expected


async def invalid_json(env: Env) -> Outcome:
    orders = env.name("orders")

    class Orders(Service):
        name = orders
        # One handler at a time, so the marker sent after the bad message is handled after it.
        concurrency = 1

        @route("create")
        async def create(self, body: dict[str, Any]) -> None:
            env.record(body)

    async with env.serve() as backend:
        broker = backend.messenger.broker
        properties = broker.properties(content_type=codec.JSON)
        await broker.publish(env.overrides["exchange"], f"{orders}.create", b"{not json", properties)
        await backend.messenger.send(f"{orders}.create", {"marker": True})
        await backend.settle(lambda items: len(items) == 1)
        letters = await backend.dead_letters(f"{orders}.create")
    outcome = {"seen": env.recorder.items, "dead": [dead_letter_outcome(letter) for letter in letters]}
    reason = "invalid JSON body: unexpected character, expected a string key: line 1 column 2 (char 1)"
    expected = {
        "seen": [{"marker": True}],
        "dead": [dead(f"{orders}.create", b"{not json", "BadMessage", reason, service=orders)],
    }
    return outcome, expected


async def no_route(env: Env) -> Outcome:
    billing = env.name("billing")
    nowhere = env.name("nowhere")

    @microservice("charge", service=billing)
    async def charge(body: Any) -> None:
        env.record(body)

    async with env.serve() as backend:
        with pytest.raises(NoRoute) as sent:
            await backend.messenger.send(f"{nowhere}.create", {"id": 1})
        with pytest.raises(NoRoute) as called:
            await backend.messenger.call(f"{billing}.refund", {"id": 1}, timeout=10)
        # An event without subscribers is dropped without an error.
        await backend.messenger.emit(f"{nowhere}.happened", {"id": 1})
    outcome = {"send": error_outcome(sent.value), "call": error_outcome(called.value)}
    exchange = env.overrides["exchange"]
    expected = {
        "send": {
            "raised": "NoRoute",
            "text": f"no queue is bound to '{nowhere}.create' on exchange '{exchange}': "
            "check the target name, or start the service that consumes it",
        },
        "call": {
            "raised": "NoRoute",
            "text": f"no queue is bound to '{billing}.refund' on exchange '{exchange}': "
            "check the target name, or start the service that consumes it",
        },
    }
    return outcome, expected


async def reject(env: Env) -> Outcome:
    stock = env.name("stock")

    class Stock(Service):
        name = stock

        @route("reserve")
        async def reserve(self, ctx: Context) -> None:
            env.record(ctx.attempt)
            raise Reject("out of stock")

    async with env.serve() as backend:
        await backend.messenger.send(f"{stock}.reserve", {"sku": "A-1"})
        await backend.settle(lambda items: len(items) == 1)
        letters = await backend.dead_letters(f"{stock}.reserve")
    outcome = {"seen": env.recorder.items, "dead": [dead_letter_outcome(letter) for letter in letters]}
    expected = {
        "seen": [1],
        "dead": [dead(f"{stock}.reserve", {"sku": "A-1"}, "Reject", "out of stock", service=stock)],
    }
    return outcome, expected


async def fails_twice_then_succeeds(env: Env) -> Outcome:
    mail = env.name("mail")
    queue = f"{mail}.send"

    class Mail(Service):
        name = mail

        @route("send")
        async def send(self, ctx: Context) -> None:
            message = ctx.message
            env.record((ctx.attempt, message.exchange, message.routing_key, ctx.redelivered))
            if ctx.attempt < 3:
                raise ConnectionError(f"smtp down at attempt {ctx.attempt}")

    async with env.serve() as backend:
        await backend.messenger.send(queue, {"to": "a@example.org"})
        await backend.settle(lambda items: len(items) == 3)
        letters = await backend.dead_letters(queue)
    outcome = {"seen": env.recorder.items, "dead": letters}
    exchange = env.overrides["exchange"]
    seen = [(1, exchange, queue, False), (2, "", queue, False), (3, "", queue, False)]
    return outcome, {"seen": seen, "dead": []}


async def poison_message(env: Env) -> Outcome:
    mail = env.name("mail")
    queue = f"{mail}.send"

    class Mail(Service):
        name = mail

        @route("send", retries=2)
        async def send(self, ctx: Context) -> None:
            env.record(ctx.attempt)
            raise ValueError("poison pill")

    async with env.serve() as backend:
        await backend.messenger.send(queue, {"to": "b@example.org"})
        await backend.settle(lambda items: len(items) == 3)
        letters = await backend.dead_letters(queue)
    outcome = {"seen": env.recorder.items, "dead": [dead_letter_outcome(letter) for letter in letters]}
    first, second = f"{queue}.retry.50", f"{queue}.retry.100"
    letter = dead(
        queue,
        {"to": "b@example.org"},
        "ValueError",
        "ValueError: poison pill",
        attempt=3,
        trace_last_line="ValueError: poison pill",
        deaths=[(second, "expired", 1, "", (second,)), (first, "expired", 1, "", (first,))],
        service=mail,
    )
    return outcome, {"seen": [1, 2, 3], "dead": [letter]}


async def event_fan_out(env: Env) -> Outcome:
    shipping, audit, billing = env.name("shipping"), env.name("audit"), env.name("billing")

    class Shipping(Service):
        name = shipping

        @on_event("order.created")
        async def created(self, ctx: Context) -> None:
            env.record((shipping, ctx.body, ctx.routing_key))

    class Audit(Service):
        name = audit

        @on_event("order.*")
        async def any_order(self, ctx: Context) -> None:
            env.record((audit, ctx.body, ctx.routing_key))

    class Billing(Service):
        name = billing

        @on_event("invoice.#")
        async def invoices(self, ctx: Context) -> None:
            env.record((billing, ctx.body, ctx.routing_key))

    async with env.serve() as backend:
        await backend.messenger.emit("order.created", {"id": 7})
        await backend.settle(lambda items: len(items) == 2)
    outcome = sorted(env.recorder.items)
    key = names.event_routing_key("order.created")
    return outcome, sorted([(shipping, {"id": 7}, key), (audit, {"id": 7}, key)])


async def default_route(env: Env) -> Outcome:
    greeter = env.name("greeter")

    @microservice(service=greeter)
    async def handle(ctx: Context) -> None:
        env.record((ctx.service, ctx.route, ctx.body, ctx.routing_key))

    async with env.serve() as backend:
        await backend.messenger.send(greeter, "hello")
        await backend.settle(lambda items: len(items) == 1)
    return env.recorder.items, [(greeter, None, "hello", greeter)]


async def rpc_timeout(env: Env) -> Outcome:
    reports = env.name("reports")

    class Reports(Service):
        name = reports

        @route("build")
        async def build(self) -> str:
            env.record("started")
            await asyncio.sleep(1.0)
            return "late"

    async with env.serve() as backend:
        with pytest.raises(RpcTimeout) as raised:
            await backend.messenger.call(f"{reports}.build", {}, timeout=0.3)
        await backend.settle(lambda items: len(items) == 1)
    outcome = {"error": error_outcome(raised.value), "timeout_error": isinstance(raised.value, TimeoutError)}
    text = f"no reply from '{reports}.build' within 0.3 s; the request may still be processed"
    return outcome, {"error": {"raised": "RpcTimeout", "text": text}, "timeout_error": True}


async def headers_round_trip(env: Env) -> Outcome:
    inbox = env.name("inbox")

    class Inbox(Service):
        name = inbox

        @route("put")
        async def put(self, ctx: Context) -> None:
            env.record({key: value for key, value in ctx.headers.items() if key.startswith("x-app-")})

    sent_at = datetime.datetime(2024, 5, 1, 12, 30, 15, 999, tzinfo=datetime.UTC)
    headers = {"x-app-tags": ["a", "b"], "x-app-count": 3, "x-app-ratio": 0.1, "x-app-at": sent_at}
    async with env.serve() as backend:
        await backend.messenger.send(f"{inbox}.put", {}, headers=headers)
        await backend.settle(lambda items: len(items) == 1)
    # AMQP timestamps have whole seconds, and pamqp sends a Python float as a 32-bit float.
    expected = [
        {
            "x-app-tags": ["a", "b"],
            "x-app-count": 3,
            "x-app-ratio": struct.unpack(">f", struct.pack(">f", 0.1))[0],
            "x-app-at": sent_at.replace(microsecond=0),
        }
    ]
    return env.recorder.items, expected


async def expired_call_in_busy_queue(env: Env) -> Outcome:
    reports = env.name("reports")
    first_started = asyncio.Event()

    class Reports(Service):
        name = reports
        concurrency = 1
        prefetch = 1

        @route("build")
        async def build(self, body: int) -> int:
            env.record(body)
            first_started.set()
            await asyncio.sleep(0.5)
            return body

    replies: list[int] = []

    async def call_first(backend: Backend) -> None:
        replies.append(await backend.messenger.call(f"{reports}.build", 1, timeout=10))

    async with env.serve() as backend:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call_first, backend)
            await first_started.wait()
            with pytest.raises(RpcTimeout) as raised:
                await backend.messenger.call(f"{reports}.build", 2, timeout=0.1)
        await backend.settle(lambda items: len(items) >= 1)
    # The second request expires at the head of the queue while the first uses the only prefetch slot.
    outcome = {"error": type(raised.value).__name__, "replies": replies, "seen": env.recorder.items}
    return outcome, {"error": "RpcTimeout", "replies": [1], "seen": [1]}


SCENARIOS: list[Callable[[Env], Awaitable[Outcome]]] = [
    rpc_reply,
    remote_error,
    validation_failure,
    invalid_json,
    no_route,
    reject,
    fails_twice_then_succeeds,
    poison_message,
    event_fan_out,
    default_route,
    rpc_timeout,
    headers_round_trip,
    expired_call_in_busy_queue,
]


@pytest.mark.anyio
@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_same_outcome_on_both_backends(
    scenario: Callable[[Env], Awaitable[Outcome]], broker_url: str, unique: str
) -> None:
    overrides = {"broker_url": broker_url, "exchange": f"t{unique}", "retry_delay_s": 0.05}
    outcomes: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    for kind in BACKENDS:
        with registry.isolated():
            try:
                outcomes[kind], expected[kind] = await scenario(Env(kind, unique, overrides))
            except Exception as exc:
                raise AssertionError(f"scenario {scenario.__name__} failed on {kind}: {exc!r}") from exc

    assert outcomes["rabbitmq"] == expected["rabbitmq"]
    assert outcomes["testbroker"] == outcomes["rabbitmq"]
