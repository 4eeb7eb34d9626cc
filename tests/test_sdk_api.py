"""Tests of the SDK's public names and of defining services, against the real broker."""

from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger

import sdk
from sdk import Client, Context, DefinitionError, Service, microservice, on_event, route
from sdk.runtime import ServiceHost
from sdk.service import ServiceSpec, registry
from sdk.settings import SettingsModel

# Logs one line as if from a module of the SDK: loguru filters by the caller's module name.
LOG_PROBE = "from loguru import logger\nlogger.info('probe line')"

PUBLIC_NAMES = [
    "BadMessage",
    "BrokerUnavailable",
    "Client",
    "Context",
    "DefinitionError",
    "MrqError",
    "NoRoute",
    "Reject",
    "RemoteError",
    "Retry",
    "RpcTimeout",
    "Service",
    "SettingsError",
    "TopologyError",
    "__version__",
    "microservice",
    "on_event",
    "route",
    "run",
    "settings",
]


@asynccontextmanager
async def serving(
    mrq_settings: SettingsModel, specs: list[ServiceSpec] | None = None
) -> AsyncIterator[Client]:
    """Serve the registered services (or `specs`) and yield a client on the same exchange."""
    host = ServiceHost(specs if specs is not None else registry.specs(), mrq_settings)
    async with host, Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
        yield client


# Public names.


def test_public_names_import() -> None:
    from sdk import (  # noqa: F401
        Client,
        Context,
        NoRoute,
        Reject,
        RemoteError,
        Retry,
        Service,
        microservice,
        on_event,
        route,
        run,
        settings,
    )


def test_all_is_pinned() -> None:
    assert sorted(sdk.__all__) == PUBLIC_NAMES


def test_all_names_resolve() -> None:
    missing = [name for name in sdk.__all__ if not hasattr(sdk, name)]

    assert missing == []


def test_sdk_logs_disabled_until_enabled() -> None:
    lines: list[str] = []
    sink_id = logger.add(lines.append, level="TRACE", format="{name} {message}")
    try:
        exec(LOG_PROBE, {"__name__": "sdk.probe"})
        logger.enable("sdk")
        exec(LOG_PROBE, {"__name__": "sdk.probe"})
    finally:
        logger.disable("sdk")
        logger.remove(sink_id)

    assert lines == ["sdk.probe probe line\n"]


# Class services.


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_class_service_serves_routes_and_default(mrq_settings: SettingsModel, unique: str) -> None:
    class Calc(Service):
        name = f"calc{unique}"

        @route("add")
        async def add(self, numbers: list[int]) -> int:
            return sum(numbers)

        async def handle(self, ctx: Context) -> str:
            return f"default route got {ctx.body}"

    async with serving(mrq_settings) as client:
        total = await client.call(f"calc{unique}.add", [1, 2, 3], timeout=10)
        default = await client.call(f"calc{unique}", "hi", timeout=10)

    assert total == 6
    assert default == "default route got hi"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_class_hooks_run_once_around_serving(mrq_settings: SettingsModel, unique: str) -> None:
    calls: list[str] = []

    class Hooked(Service):
        name = f"hooked{unique}"

        async def on_start(self) -> None:
            calls.append("start")

        async def on_stop(self) -> None:
            calls.append("stop")

        async def handle(self, ctx: Context) -> list[str]:
            return list(calls)

    async with serving(mrq_settings) as client:
        seen_by_handler = await client.call(f"hooked{unique}", None, timeout=10)
        await client.call(f"hooked{unique}", None, timeout=10)
        assert calls == ["start"]

    assert seen_by_handler == ["start"]
    assert calls == ["start", "stop"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_event_subscriber_gets_emitted_event(mrq_settings: SettingsModel, unique: str) -> None:
    received: list[Any] = []
    arrived = anyio.Event()

    class Listener(Service):
        name = f"listener{unique}"

        @on_event("order.*")
        async def on_order(self, ctx: Context) -> None:
            received.append((ctx.routing_key, ctx.route, ctx.body))
            arrived.set()

    async with serving(mrq_settings) as client:
        await client.emit("order.created", {"id": 1})
        with anyio.fail_after(10):
            await arrived.wait()

    assert received == [("event.order.created", "order.*", {"id": 1})]


# Function services.


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_function_service_serves_route_and_default(mrq_settings: SettingsModel, unique: str) -> None:
    service = f"fn{unique}"

    @microservice(route="echo", service=service)
    async def echo(ctx: Context) -> Any:
        return {"route": ctx.route, "body": ctx.body}

    @microservice(service=service)
    def default(body: str) -> str:
        return body.upper()

    async with serving(mrq_settings) as client:
        echoed = await client.call(f"{service}.echo", [1], timeout=10)
        shouted = await client.call(service, "quiet", timeout=10)

    assert echoed == {"route": "echo", "body": [1]}
    assert shouted == "QUIET"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_function_service_name_from_env(
    mrq_settings: SettingsModel, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = f"envnamed{unique}"

    @microservice(route="who")
    async def who(ctx: Context) -> str:
        return ctx.service

    monkeypatch.setenv("MRQ_SERVICE_NAME", service)
    resolved = sdk.settings.resolve(broker_url=mrq_settings.broker_url, exchange=mrq_settings.exchange)
    specs = registry.specs(resolved.service_name)

    async with serving(resolved, specs) as client:
        answer = await client.call(f"{service}.who", None, timeout=10)

    assert [spec.name for spec in specs] == [service]
    assert answer == service


def test_function_service_without_name_rejected() -> None:
    @microservice(route="orphan")
    async def orphan(ctx: Context) -> None:
        return None

    with pytest.raises(DefinitionError, match=r"orphan names no service: pass service='NAME'"):
        registry.specs()


# Registration at import.


def write_module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


def test_services_register_at_import(tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"svcmod{unique}"
    write_module(
        tmp_path,
        module,
        "from sdk import Context, Service, microservice, route\n"
        f"class Stock(Service):\n    name = 'stock{unique}'\n"
        "    @route('count')\n    async def count(self, ctx: Context) -> int:\n        return 1\n"
        f"@microservice(route='ship', service='shipping{unique}')\n"
        "async def ship(ctx: Context) -> None:\n    return None\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.specs() == []

    importlib.import_module(module)
    specs = {spec.name: spec for spec in registry.specs()}
    sys.modules.pop(module, None)

    assert sorted(specs) == sorted([f"stock{unique}", f"shipping{unique}"])
    assert [r.queue(f"stock{unique}") for r in specs[f"stock{unique}"].routes] == [f"stock{unique}.count"]
    assert [r.queue(f"shipping{unique}") for r in specs[f"shipping{unique}"].routes] == [
        f"shipping{unique}.ship"
    ]


def test_class_without_name_not_registered() -> None:
    class Base(Service):
        async def handle(self, ctx: Context) -> None:
            return None

    assert registry.specs() == []


# Definition errors.


def test_bad_service_name_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"invalid service name 'Bad\.Name' in service class"):

        class Bad(Service):
            name = "Bad.Name"

            async def handle(self, ctx: Context) -> None:
                return None


def test_reserved_service_name_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"service name 'event' .* is reserved"):
        microservice(service="event")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("has space", r"invalid route name 'has space' in @route: expected words"),
        ("a..b", r"invalid route name 'a\.\.b'"),
        ("_private", r"route name '_private' in @route is reserved"),
        ("on.thing", r"route name 'on\.thing' in @route is reserved"),
    ],
)
def test_bad_route_name_rejected(name: str, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        route(name)


def test_bad_event_pattern_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"invalid event pattern 'order created'"):
        on_event("order created")


def test_duplicate_class_route_rejected(unique: str) -> None:
    with pytest.raises(
        DefinitionError, match=r"defines route 'pay' twice \((first|second) and (first|second)\)"
    ):

        class Twice(Service):
            name = f"twice{unique}"

            @route("pay")
            async def first(self, ctx: Context) -> None:
                return None

            @route("pay")
            async def second(self, ctx: Context) -> None:
                return None


def test_duplicate_function_route_rejected(unique: str) -> None:
    @microservice(route="pay", service=f"dup{unique}")
    async def first(ctx: Context) -> None:
        return None

    @microservice(route="pay", service=f"dup{unique}")
    async def second(ctx: Context) -> None:
        return None

    with pytest.raises(DefinitionError, match=r"has two handlers for route 'pay': .*first and .*second"):
        registry.specs()


def test_class_without_routes_rejected(unique: str) -> None:
    with pytest.raises(DefinitionError, match=r"Empty has no routes: decorate a method with @route"):

        class Empty(Service):
            name = f"empty{unique}"


def test_class_and_functions_for_one_service_rejected(unique: str) -> None:
    class Both(Service):
        name = f"both{unique}"

        async def handle(self, ctx: Context) -> None:
            return None

    @microservice(route="extra", service=f"both{unique}")
    async def extra(ctx: Context) -> None:
        return None

    with pytest.raises(DefinitionError, match=r"defined both as a class and by @microservice functions"):
        registry.specs()


def test_event_and_route_together_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"takes either route= or event=, not both"):
        microservice(route="a", event="b", service="svc")


def test_negative_retries_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"retries in @route must be an integer >= 0, got -1"):
        route("a", retries=-1)


def test_handler_with_extra_parameters_rejected(mrq_settings: SettingsModel, unique: str) -> None:
    class Greedy(Service):
        name = f"greedy{unique}"

        async def handle(self, ctx: Context, body: Any, extra: Any) -> None:
            return None

    with pytest.raises(DefinitionError, match=r"takes more parameters than a handler gets"):
        ServiceHost(registry.specs(), mrq_settings)


def test_blocking_async_handler_rejected(mrq_settings: SettingsModel, unique: str) -> None:
    class Confused(Service):
        name = f"confused{unique}"

        @route("work", blocking=True)
        async def work(self, ctx: Context) -> None:
            return None

    with pytest.raises(DefinitionError, match=r"is async; blocking=True is for plain functions"):
        ServiceHost(registry.specs(), mrq_settings)


def test_host_without_services_rejected(mrq_settings: SettingsModel) -> None:
    with pytest.raises(DefinitionError, match=r"no services to run"):
        ServiceHost([], mrq_settings)
