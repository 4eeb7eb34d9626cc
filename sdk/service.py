"""Service definitions: the `Service` base class, `@route`, `@on_event`, `@microservice`.

Defining a service registers it: a `Service` subclass with a `name` when its
class body runs, a decorated function when its module is imported. `run()`
and the worker serve what the registry holds.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, TypeVar

from sdk import names
from sdk.errors import DefinitionError

F = TypeVar("F", bound=Callable[..., Any])

_ROUTE_MARK = "__mrq_route__"
# Route names whose queue would be the dead-letter or delay queue of another route.
_SHADOWS_OWN_QUEUE = re.compile(r"(^|\.)dead$|(^|\.)retry\.[0-9]+(\.|$)")


@dataclass(frozen=True)
class RouteSpec:
    """One consumer: a route of a service, or a subscription to events."""

    kind: Literal["route", "event"]
    name: str | None
    func: Callable[..., Any]
    blocking: bool = False
    retries: int | None = None
    retry_delay_s: float | None = None
    attribute: str | None = None
    timeout_s: float | None = None

    def queue(self, service: str) -> str:
        if self.kind == "event":
            assert self.name is not None
            return names.event_queue(service, self.name)
        return names.route_queue(service, self.name)

    def binding_key(self, service: str) -> str:
        if self.kind == "event":
            assert self.name is not None
            return names.event_routing_key(self.name)
        return names.route_queue(service, self.name)

    def label(self, service: str) -> str:
        if self.kind == "event":
            return f"{service} on event {self.name}"
        return names.route_queue(service, self.name)


@dataclass(frozen=True)
class ServiceSpec:
    """A service to run: its name, its routes and its per-service options."""

    name: str
    routes: tuple[RouteSpec, ...]
    cls: type[Service] | None = None
    prefetch: int | None = None
    concurrency: int | None = None
    queue_type: Literal["classic", "quorum"] | None = None

    def instantiate(self) -> Service | None:
        return self.cls() if self.cls is not None else None


def _check_route_name(route: str | None, where: str) -> None:
    if route is None:
        return
    if not names.ROUTE_NAME_RE.match(route):
        raise DefinitionError(
            f"invalid route name {route!r} in {where}: expected words of letters, digits, - or _ "
            "joined by dots, such as 'create' or 'orders.create'"
        )
    if route.startswith("_") or route == "on" or route.startswith("on.") or _SHADOWS_OWN_QUEUE.search(route):
        raise DefinitionError(
            f"route name {route!r} in {where} is reserved: names starting with '_' or 'on.', "
            "ending in 'dead' or containing 'retry.<number>' would share a queue with the "
            "subscriptions, dead letters or delayed retries of another route; choose another name"
        )


def _check_service_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not names.SERVICE_NAME_RE.match(name):
        raise DefinitionError(
            f"invalid service name {name!r} in {where}: expected a lower-case name such as 'billing' "
            "(a-z, 0-9, - and _; no dots)"
        )
    if name in names.RESERVED_SERVICE_NAMES:
        raise DefinitionError(f"service name {name!r} in {where} is reserved; choose another name")


def _check_options(
    retries: int | None, retry_delay_s: float | None, where: str, timeout_s: float | None = None
) -> None:
    if retries is not None and (not isinstance(retries, int) or retries < 0):
        raise DefinitionError(f"retries in {where} must be an integer >= 0, got {retries!r}")
    if retry_delay_s is not None and not (0 <= retry_delay_s < math.inf):
        raise DefinitionError(f"retry_delay_s in {where} must be a finite number >= 0, got {retry_delay_s!r}")
    if timeout_s is not None and not (0 < timeout_s < math.inf):
        raise DefinitionError(f"timeout_s in {where} must be a finite number > 0, got {timeout_s!r}")


def _attach(func: Any, spec: RouteSpec) -> None:
    """Mark `func` with its route; a staticmethod or classmethod is marked through its function."""
    target = func.__func__ if isinstance(func, staticmethod | classmethod) else func
    setattr(target, _ROUTE_MARK, spec)


def route(
    name: str | None = None,
    *,
    blocking: bool = False,
    retries: int | None = None,
    retry_delay_s: float | None = None,
    timeout_s: float | None = None,
) -> Callable[[F], F]:
    """Mark a method of a `Service` as the handler of route `name` (queue `<service>.<name>`).

    `blocking=True` runs a plain function in a worker thread. `retries`,
    `retry_delay_s` and `timeout_s` override the settings `retries`,
    `retry_delay_s` and `handler_timeout_s` for this route.
    """
    _check_route_name(name, "@route")
    _check_options(retries, retry_delay_s, "@route", timeout_s)

    def mark(func: F) -> F:
        spec = RouteSpec(
            "route", name, func, blocking, retries, retry_delay_s, _name_of(func), timeout_s=timeout_s
        )
        _attach(func, spec)
        return func

    return mark


def on_event(
    pattern: str,
    *,
    blocking: bool = False,
    retries: int | None = None,
    retry_delay_s: float | None = None,
    timeout_s: float | None = None,
) -> Callable[[F], F]:
    """Mark a method of a `Service` as a subscriber to events matching `pattern`.

    Patterns use topic syntax: `order.created`, `order.*`, `#`. Every
    subscribing service gets a copy; the instances of one service share it.
    """
    if not isinstance(pattern, str) or not names.EVENT_PATTERN_RE.match(pattern):
        raise DefinitionError(
            f"invalid event pattern {pattern!r}: expected dot-separated words, '*' or '#', "
            "such as 'order.created' or 'order.*'"
        )
    _check_options(retries, retry_delay_s, "@on_event", timeout_s)

    def mark(func: F) -> F:
        spec = RouteSpec(
            "event", pattern, func, blocking, retries, retry_delay_s, _name_of(func), timeout_s=timeout_s
        )
        _attach(func, spec)
        return func

    return mark


def _name_of(func: Any) -> str:
    target = func.__func__ if isinstance(func, staticmethod | classmethod) else func
    return str(getattr(target, "__name__", "handler"))


class Service:
    """Base class of class-based services.

    Set `name`; decorate methods with `@route("create")` (queue `<name>.create`)
    or `@on_event("pattern")`; define `async def handle(self, ctx)` for the
    default route (queue `<name>`). `on_start` and `on_stop` run once per
    process around serving. Class attributes `prefetch`, `concurrency` and
    `queue_type` override the settings of the same names for this service.
    """

    name: ClassVar[str | None] = None
    prefetch: ClassVar[int | None] = None
    concurrency: ClassVar[int | None] = None
    queue_type: ClassVar[Literal["classic", "quorum"] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") is None:
            return
        registry.add_class(cls)

    async def on_start(self) -> None:
        """Run before the service consumes its first message."""

    async def on_stop(self) -> None:
        """Run after the service consumed its last message."""


def class_routes(cls: type[Service]) -> tuple[RouteSpec, ...]:
    """Collect the routes of a service class, the default `handle` route included."""
    where = f"service class {cls.__qualname__}"
    found: dict[str, RouteSpec] = {}
    for attribute in dir(cls):
        value = getattr(cls, attribute, None)
        spec = getattr(value, _ROUTE_MARK, None)
        if isinstance(spec, RouteSpec):
            spec = replace(spec, attribute=attribute)
        elif attribute == "handle" and callable(value):
            spec = RouteSpec("route", None, value, attribute="handle")
        else:
            continue
        key = f"{spec.kind}:{spec.name}"
        if key in found:
            raise DefinitionError(
                f"{where} defines {spec.kind} {spec.name!r} twice "
                f"({found[key].attribute} and {attribute}); keep one"
            )
        found[key] = spec
    if not found:
        raise DefinitionError(
            f"{where} has no routes: decorate a method with @route(...) or @on_event(...), "
            "or define async def handle(self, ctx)"
        )
    return tuple(found.values())


@dataclass
class _FunctionRoute:
    service: str | None
    spec: RouteSpec
    prefetch: int | None = None
    concurrency: int | None = None


def microservice(
    route: str | None = None,
    *,
    service: str | None = None,
    event: str | None = None,
    blocking: bool = False,
    retries: int | None = None,
    retry_delay_s: float | None = None,
    timeout_s: float | None = None,
    prefetch: int | None = None,
    concurrency: int | None = None,
) -> Callable[[F], F]:
    """Register a function as the handler of `route` of `service`.

    `service` defaults to the configured service name (`settings.service_name`,
    `MRQ_SERVICE_NAME` or `SERVICE_NAME`), read when the service starts. Without
    `route` the function handles the default route (queue `<service>`). With
    `event="pattern"` it subscribes to events instead.
    """
    if service is not None:
        _check_service_name(service, "@microservice")
    if event is not None and route is not None:
        raise DefinitionError("@microservice takes either route= or event=, not both")
    _check_options(retries, retry_delay_s, "@microservice", timeout_s)

    def mark(func: F) -> F:
        if event is not None:
            spec = getattr(on_event(event, blocking=blocking)(func), _ROUTE_MARK)
        else:
            _check_route_name(route, "@microservice")
            spec = RouteSpec("route", route, func, blocking)
        spec = replace(
            spec, retries=retries, retry_delay_s=retry_delay_s, timeout_s=timeout_s, attribute=func.__name__
        )
        registry.add_function(_FunctionRoute(service, spec, prefetch, concurrency))
        return func

    return mark


@dataclass
class ServiceRegistry:
    """The services defined in this process, in definition order."""

    classes: list[type[Service]] = field(default_factory=list)
    functions: list[_FunctionRoute] = field(default_factory=list)

    def add_class(self, cls: type[Service]) -> None:
        _check_service_name(cls.__dict__["name"], f"service class {cls.__qualname__}")
        class_routes(cls)
        self.classes = [
            c for c in self.classes if c.__qualname__ != cls.__qualname__ or c.__module__ != cls.__module__
        ]
        self.classes.append(cls)

    def add_function(self, entry: _FunctionRoute) -> None:
        self.functions.append(entry)

    def specs(self, default_service: str | None = None) -> list[ServiceSpec]:
        """Return every registered service; function services without a name get `default_service`."""
        specs = [_class_spec(cls) for cls in self.classes]
        grouped: dict[str, list[_FunctionRoute]] = {}
        for entry in self.functions:
            service = entry.service or default_service
            if service is None:
                raise DefinitionError(
                    f"@microservice function {entry.spec.func.__qualname__} names no service: "
                    "pass service='NAME', or set MRQ_SERVICE_NAME (settings.service_name)"
                )
            _check_service_name(service, "the service name setting")
            grouped.setdefault(service, []).append(entry)
        taken = {spec.name for spec in specs}
        for service, entries in grouped.items():
            if service in taken:
                raise DefinitionError(
                    f"service {service!r} is defined both as a class and by @microservice functions; "
                    "use one form per service"
                )
            specs.append(_function_spec(service, entries))
        return specs

    def clear(self) -> None:
        self.classes.clear()
        self.functions.clear()

    @contextmanager
    def isolated(self) -> Iterator[ServiceRegistry]:
        """Run a block with an empty registry, then restore the previous content (for tests)."""
        saved = (list(self.classes), list(self.functions))
        self.clear()
        try:
            yield self
        finally:
            self.classes[:], self.functions[:] = saved


def _class_spec(cls: type[Service]) -> ServiceSpec:
    return ServiceSpec(
        name=cls.__dict__["name"],
        routes=class_routes(cls),
        cls=cls,
        prefetch=cls.prefetch,
        concurrency=cls.concurrency,
        queue_type=cls.queue_type,
    )


def _function_spec(service: str, entries: list[_FunctionRoute]) -> ServiceSpec:
    seen: dict[str, RouteSpec] = {}
    for entry in entries:
        key = f"{entry.spec.kind}:{entry.spec.name}"
        if key in seen:
            raise DefinitionError(
                f"service {service!r} has two handlers for {entry.spec.kind} {entry.spec.name!r}: "
                f"{seen[key].func.__qualname__} and {entry.spec.func.__qualname__}; keep one"
            )
        seen[key] = entry.spec
    prefetch = next((e.prefetch for e in entries if e.prefetch is not None), None)
    concurrency = next((e.concurrency for e in entries if e.concurrency is not None), None)
    return ServiceSpec(service, tuple(seen.values()), None, prefetch, concurrency)


def is_coroutine_function(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func)


registry = ServiceRegistry()
