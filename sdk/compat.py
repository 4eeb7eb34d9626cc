"""The older service API, built on the current one: `CreateService`, `Microservise` and `run`.

Old code keeps working unchanged while it moves to the current API::

    class Orders(CreateService):
        service = "orders"

        async def context(self, channel, method, properties, body):
            await self.send_message(body, "billing.charge")

Each `CreateService` subclass with a `service` name generates a `Service`
subclass whose default route (queue `<service>`) calls `context`, so both
styles share routing, retries, dead-lettering and `run()`. `Microservise` is
`microservice` with the handler always called with the `Context` alone.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sdk.context import Context
from sdk.errors import DefinitionError
from sdk.runner import run
from sdk.service import Service, microservice

__all__ = ["CreateService", "Method", "Microservise", "run"]

F = TypeVar("F", bound=Callable[..., Any])

EXCHANGE_TYPES = ("direct", "topic")

# Options that an old-style class may set and the generated Service takes over.
_SERVICE_OPTIONS = ("prefetch", "concurrency", "queue_type")

# The delivery that the current task handles, for `send_message`.
_current: contextvars.ContextVar[Context] = contextvars.ContextVar("mrq_compat_context")


@dataclass(frozen=True)
class Method:
    """The delivery fields that old handlers receive as `method`."""

    delivery_tag: int | None
    routing_key: str | None
    exchange: str | None
    redelivered: bool
    consumer_tag: str | None


class CreateService:
    """Base class of old-style services.

    Set `service` and define `async def context(self, channel, method,
    properties, body)`. mrq acks the delivery when `context` returns, so
    `context` must not ack, nack or reject it through `channel`. A value
    that `context` returns is the reply to a call.
    """

    service: ClassVar[str | None] = None
    service_class: ClassVar[type[Service] | None] = None
    """The generated `Service` subclass that serves this class."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("service")
        if name is None:
            return
        if cls.context is CreateService.context or not inspect.iscoroutinefunction(cls.context):
            raise DefinitionError(
                f"old-style service class {cls.__qualname__} needs "
                "async def context(self, channel, method, properties, body)"
            )
        cls.service_class = _service_class(cls, name)

    async def context(self, *args: Any, **kwargs: Any) -> Any:
        """Handle one message, given as `(channel, method, properties, body)`. Each service overrides it."""
        raise NotImplementedError

    async def send_message(self, body: Any, route: str, exchange_type: str = "direct") -> None:
        """Send `body` to `route` (`billing` or `billing.charge`) while `context` handles a message.

        Both exchange types publish to the application exchange, a topic
        exchange on which an exact routing key reaches the same queue as on a
        direct one. Raise NoRoute when no queue is bound to `route`.
        """
        if exchange_type not in EXCHANGE_TYPES:
            raise ValueError(
                f"invalid exchange_type {exchange_type!r}: expected 'direct' or 'topic', which both send "
                "to the application exchange. To reach every subscriber, emit an event with ctx.emit()"
            )
        ctx = _current.get(None)
        if ctx is None:
            raise RuntimeError(
                "send_message works only while context() handles a message. "
                "Use sdk.Client to send from elsewhere"
            )
        await ctx.send(route, body)


class _LegacyAdapter(Service):
    """Serves an old-style class: its default route calls `context` of one instance."""

    legacy_class: ClassVar[type[CreateService]]

    def __init__(self) -> None:
        self.legacy = self.legacy_class()

    async def handle(self, ctx: Context) -> Any:
        return await _call_context(self.legacy, ctx)


def _service_class(legacy: type[CreateService], name: str) -> type[Service]:
    """Generate (and so register) the Service subclass that serves `legacy` on queue `name`."""
    namespace: dict[str, Any] = {
        "name": name,
        "legacy_class": legacy,
        "__module__": legacy.__module__,
        "__qualname__": legacy.__qualname__,
        "__doc__": legacy.__doc__,
    }
    for option in _SERVICE_OPTIONS:
        if getattr(legacy, option, None) is not None:
            namespace[option] = getattr(legacy, option)
    return type(legacy.__name__, (_LegacyAdapter,), namespace)


async def _call_context(legacy: CreateService, ctx: Context) -> Any:
    message = ctx.message
    method = Method(
        delivery_tag=message.delivery_tag,
        routing_key=message.routing_key,
        exchange=message.exchange,
        redelivered=ctx.redelivered,
        consumer_tag=message.consumer_tag,
    )
    token = _current.set(ctx)
    try:
        return await legacy.context(message.channel, method, message.properties, message.body)
    finally:
        _current.reset(token)


def Microservise(route: str | None = None, service: str | None = None, **options: Any) -> Callable[[F], F]:
    """Register a function as the handler of `route` of `service`, called with the `Context` alone.

    `options` are those of `microservice` (`blocking`, `retries`, ...).
    """

    def mark(func: F) -> F:
        microservice(route=route, service=service, **options)(_context_only(func))
        return func

    return mark


def _context_only(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `func` so that it gets the Context whatever its parameter is called."""
    if inspect.iscoroutinefunction(func):

        async def call_async(ctx: Context) -> Any:
            return await func(ctx)

        wrapper: Callable[..., Any] = call_async
    else:

        def call(ctx: Context) -> Any:
            return func(ctx)

        wrapper = call
    wrapper.__name__ = func.__name__
    wrapper.__qualname__ = func.__qualname__
    wrapper.__module__ = func.__module__
    return wrapper
