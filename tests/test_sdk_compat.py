"""Tests of the older API (`sdk.compat`) against the real broker, next to current-style services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiormq
import anyio
import pytest

import sdk
import sdk.compat
from sdk import Client, Context, DefinitionError, NoRoute, RemoteError, Service, route
from sdk.compat import CreateService, Method, Microservise
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import SettingsModel


@asynccontextmanager
async def serving(mrq_settings: SettingsModel) -> AsyncIterator[Client]:
    """Serve the registered services and yield a client on the same exchange."""
    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        yield client


def test_compat_run_is_sdk_run() -> None:
    assert sdk.compat.run is sdk.run


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_old_service_relays_to_new_service(mrq_settings: SettingsModel, unique: str) -> None:
    deliveries: list[tuple[Any, Method, Any, bytes]] = []
    charges: list[tuple[Any, str | None]] = []
    charged = anyio.Event()

    class Orders(CreateService):
        service = f"orders{unique}"

        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
            deliveries.append((channel, method, properties, body))
            await self.send_message(f"charge {body.decode()}", f"billing{unique}.charge")

    class Billing(Service):
        name = f"billing{unique}"

        @route("charge")
        async def charge(self, ctx: Context) -> None:
            charges.append((ctx.body, ctx.routing_key))
            charged.set()

    async with serving(mrq_settings) as client:
        await client.send(f"orders{unique}", "order-7", headers={"x-trace": "t-1"})
        with anyio.fail_after(10):
            await charged.wait()

    [(channel, method, properties, body)] = deliveries
    assert isinstance(channel, aiormq.abc.AbstractChannel)
    assert isinstance(method.delivery_tag, int)
    assert method.delivery_tag > 0
    assert method.routing_key == f"orders{unique}"
    assert method.exchange == mrq_settings.exchange
    assert method.redelivered is False
    assert method.consumer_tag
    assert properties.content_type == "text/plain"
    assert properties.headers["x-trace"] == "t-1"
    assert body == b"order-7"
    assert charges == [("charge order-7", f"billing{unique}.charge")]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_old_service_answers_calls_and_keeps_options(mrq_settings: SettingsModel, unique: str) -> None:
    class Quotes(CreateService):
        service = f"quotes{unique}"
        concurrency = 3

        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> Any:
            if body == b"fail":
                raise ValueError("no quote for that")
            return {"quoted": body.decode(), "correlation_id": properties.correlation_id}

    async with serving(mrq_settings) as client:
        reply = await client.call(f"quotes{unique}", {"item": "tea"}, timeout=10)
        with pytest.raises(RemoteError, match=r"raised ValueError: no quote for that"):
            await client.call(f"quotes{unique}", "fail", timeout=10)

    assert reply["quoted"] == '{"item":"tea"}'
    assert reply["correlation_id"]
    assert Quotes.service_class is not None
    assert Quotes.service_class.concurrency == 3
    assert [spec.name for spec in registry.specs()] == [f"quotes{unique}"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_send_message_topic_and_unroutable(mrq_settings: SettingsModel, unique: str) -> None:
    outcomes: list[str] = []
    received = anyio.Event()

    class Relay(CreateService):
        service = f"relay{unique}"

        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
            await self.send_message(body, f"sink{unique}", exchange_type="topic")
            try:
                await self.send_message(body, f"nowhere{unique}")
            except NoRoute as exc:
                outcomes.append(f"NoRoute {exc.routing_key}")

    @Microservise(service=f"sink{unique}")
    async def sink(ctx: Context) -> None:
        outcomes.append(f"sink got {ctx.body!r}")
        received.set()

    async with serving(mrq_settings) as client:
        await client.send(f"relay{unique}", b"raw")
        with anyio.fail_after(10):
            await received.wait()

    assert sorted(outcomes) == sorted([f"NoRoute nowhere{unique}", "sink got b'raw'"])


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_microservise_passes_context(mrq_settings: SettingsModel, unique: str) -> None:
    @Microservise(route="api", service=f"billing{unique}")
    async def api(ctx: Context) -> Any:
        return {"body": ctx.body, "route": ctx.route}

    @Microservise(route="sync", service=f"billing{unique}")
    def sync_handler(message: Context) -> Any:
        return {"body": message.body, "service": message.service}

    async with serving(mrq_settings) as client:
        from_api = await client.call(f"billing{unique}.api", {"n": 1}, timeout=10)
        from_sync = await client.call(f"billing{unique}.sync", "x", timeout=10)

    assert from_api == {"body": {"n": 1}, "route": "api"}
    assert from_sync == {"body": "x", "service": f"billing{unique}"}


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_send_message_rejects_other_exchange_types(unique: str) -> None:
    class Orders(CreateService):
        service = f"orders{unique}"

        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
            return None

    with pytest.raises(ValueError, match=r"invalid exchange_type 'fanout': expected 'direct' or 'topic'"):
        await Orders().send_message(b"x", "billing", exchange_type="fanout")


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_send_message_outside_handler_rejected(unique: str) -> None:
    class Orders(CreateService):
        service = f"orders{unique}"

        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
            return None

    with pytest.raises(RuntimeError, match=r"send_message works only while context\(\) handles a message"):
        await Orders().send_message(b"x", "billing")


def test_old_service_without_context_rejected(unique: str) -> None:
    with pytest.raises(DefinitionError, match=r"Lazy needs async def context\(self, channel, method"):

        class Lazy(CreateService):
            service = f"lazy{unique}"


def test_old_service_with_sync_context_rejected(unique: str) -> None:
    with pytest.raises(DefinitionError, match=r"Sync needs async def context"):

        class Sync(CreateService):
            service = f"sync{unique}"

            def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:  # type: ignore[override]
                return None


def test_old_service_bad_name_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"invalid service name 'Orders\.Main'"):

        class Bad(CreateService):
            service = "Orders.Main"

            async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
                return None


def test_old_base_class_without_service_not_registered() -> None:
    class Base(CreateService):
        async def context(self, channel: Any, method: Method, properties: Any, body: bytes) -> None:
            return None

    assert Base.service_class is None
    assert registry.specs() == []
