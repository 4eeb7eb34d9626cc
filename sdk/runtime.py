"""Serving services in one process: connect, declare, consume, drain.

`ServiceHost` is what `run()` and the worker use. It opens one connection and
gives each service a consuming channel with its prefetch. Every handler runs
in a task of the host's own task group, so a dropped connection never cancels
a running handler. On stop it cancels the consumers first, waits for the
handlers in flight, acks them and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from loguru import logger

from sdk import names
from sdk.acks import AckTracker
from sdk.connection import Broker
from sdk.consumer import RouteConsumer
from sdk.errors import DefinitionError
from sdk.handler import Invoker
from sdk.messenger import Messenger
from sdk.service import RouteSpec, Service, ServiceSpec
from sdk.settings import SettingsModel
from sdk.wire import RouteInfo

_ACK_BATCH = 32
# A delay queue is declared again after this long, and deleted by the broker when
# unused for its delay plus _RETRY_QUEUE_IDLE_S; every message leaves it in time.
_RETRY_QUEUE_REFRESH_S = 30.0
_RETRY_QUEUE_IDLE_S = 60.0


@dataclass
class Stats:
    """Counters of one process, reported in heartbeats."""

    processed: int = 0
    failed: int = 0
    in_flight: int = 0


class ServiceRunner:
    """One service in a host: its channel, consumers, concurrency limit and acks."""

    def __init__(self, host: ServiceHost, spec: ServiceSpec) -> None:
        self.host = host
        self.spec = spec
        self.settings = host.settings
        self.stats = host.stats
        self.prefetch = spec.prefetch or self.settings.prefetch
        self.concurrency = spec.concurrency or self.settings.concurrency
        self.queue_type = spec.queue_type or self.settings.queue_type
        self.identity = f"{self.settings.node}/{spec.name}/{self.settings.instance}/{os.getpid()}"
        self.instance: Service | None = spec.instantiate()
        self.tracker = AckTracker(min(_ACK_BATCH, max(1, self.prefetch // 2)))
        self.semaphore = asyncio.Semaphore(self.concurrency)
        self.consumers = [self._consumer(route) for route in spec.routes]
        self.consumers.append(self._ping_consumer())
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self._channel: AbstractRobustChannel | None = None

    @property
    def broker(self) -> Broker:
        return self.host.broker

    @property
    def messenger(self) -> Messenger:
        return self.host.messenger

    @property
    def channel(self) -> AbstractRobustChannel:
        assert self._channel is not None
        return self._channel

    def _consumer(self, route: RouteSpec) -> RouteConsumer:
        func = route.func
        if self.instance is not None and route.attribute:
            func = getattr(self.instance, route.attribute)
        where = f"handler {route.label(self.spec.name)} ({getattr(func, '__qualname__', func)})"
        return RouteConsumer(self, route, Invoker(func, blocking=route.blocking, where=where))

    def _ping_consumer(self) -> RouteConsumer:
        spec = RouteSpec("route", names.PING_ROUTE, self.ping, attribute="ping")
        return RouteConsumer(self, spec, Invoker(self.ping, blocking=False, where="ping"))

    async def ping(self) -> dict[str, Any]:
        """Return the built-in ping route's reply: this instance's identity and uptime."""
        return {
            "service": self.spec.name,
            "instance": self.settings.instance,
            "node": self.settings.node,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.host.started_monotonic, 3),
            "routes": [c.queue_name for c in self.consumers if c.spec.name != names.PING_ROUTE],
        }

    async def declare(self) -> None:
        self._channel = await self.broker.channel(prefetch=self.prefetch)
        for consumer in self.consumers:
            if consumer.spec.name == names.PING_ROUTE:
                await self._declare_ping(consumer)
            else:
                await consumer.declare()

    async def _declare_ping(self, consumer: RouteConsumer) -> None:
        queue = await self.broker.declare_queue(
            self.channel, consumer.queue_name, durable=False, auto_delete=True
        )
        await queue.bind(self.settings.exchange, consumer.queue_name)
        consumer.queue = queue

    async def start(self) -> None:
        if self.instance is not None:
            await self.instance.on_start()
        for consumer in self.consumers:
            await consumer.start()

    def dispatch_to(self, consumer: RouteConsumer) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            self.tracker.track(message)
            self.in_flight += 1
            self.stats.in_flight += 1
            self.idle.clear()
            task = self.host.task_group.create_task(self._handle(consumer, message))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        return on_message

    async def _handle(self, consumer: RouteConsumer, message: AbstractIncomingMessage) -> None:
        try:
            async with self.semaphore:
                # Deliveries that arrive or wait for a slot during a drain go back unprocessed.
                if self.draining:
                    await consumer.give_back(message)
                    return
                await consumer.process(message)
        except asyncio.CancelledError:
            logger.warning(
                "handler cancelled at the stop deadline, message requeued queue={}", consumer.queue_name
            )
            await self.tracker.requeue(message)
            raise
        except Exception as exc:
            # Left unacked, the delivery would hold a prefetch slot until the channel closes.
            logger.opt(exception=exc).error("message outcome failed queue={}", consumer.queue_name)
            await consumer.salvage(message, exc)
        finally:
            self.in_flight -= 1
            self.stats.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def settle(self, message: AbstractIncomingMessage) -> None:
        """Ack a finished delivery, batching while other deliveries are in flight."""
        await self.tracker.done(message, flush=self.in_flight <= 1 or self.draining)

    async def settle_now(self, message: AbstractIncomingMessage) -> None:
        """Ack a delivery at once, because a copy of it was just published.

        Left in a batch, the original could be redelivered beside its copy
        when the process dies before the batch goes out.
        """
        await self.tracker.ack_now(message)

    async def retry_queue(self, queue: str, delay_ms: int) -> str:
        return await self.host.retry_queue(queue, delay_ms)

    async def cancel_consumers(self) -> None:
        self.draining = True
        for consumer in self.consumers:
            await consumer.cancel()

    async def drain(self, deadline: float) -> None:
        """Wait for the handlers in flight until `deadline` (loop time), then cancel the rest."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), remaining)
        left = [task for task in self.tasks if not task.done()]
        if left:
            logger.warning(
                "stop deadline reached service={} cancelled_handlers={}", self.spec.name, len(left)
            )
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        await self.tracker.flush()

    async def stop_hook(self) -> None:
        if self.instance is not None:
            try:
                await self.instance.on_stop()
            except Exception:
                logger.exception("on_stop failed service={}", self.spec.name)

    def route_infos(self) -> list[RouteInfo]:
        return [
            RouteInfo(service=self.spec.name, route=c.spec.name or "", queue=c.queue_name, kind=c.spec.kind)
            for c in self.consumers
            if c.spec.name != names.PING_ROUTE
        ]


class ServiceHost:
    """Runs a set of services in this process over one broker connection."""

    def __init__(
        self,
        specs: list[ServiceSpec],
        settings: SettingsModel,
        *,
        role: str = "run",
        broker: Broker | None = None,
    ) -> None:
        """Prepare to serve `specs`. Pass `broker` to replace the RabbitMQ connection, as sdk.testing does."""
        if not specs:
            raise DefinitionError(
                "no services to run: define a Service subclass with a name, or decorate a function "
                "with @microservice, in a module that is imported before start"
            )
        duplicates = {s.name for s in specs if sum(1 for t in specs if t.name == s.name) > 1}
        if duplicates:
            raise DefinitionError(f"services defined twice: {', '.join(sorted(duplicates))}")
        self.settings = settings
        self.specs = specs
        self.stats = Stats()
        self.started_monotonic = time.monotonic()
        service_names = ",".join(s.name for s in specs)
        connection_name = f"mrq {role} services={service_names} node={settings.node} pid={os.getpid()}"
        self.broker = broker if broker is not None else Broker(settings, connection_name=connection_name)
        self.messenger = Messenger(self.broker)
        self.runners = [ServiceRunner(self, spec) for spec in specs]
        self._task_group: asyncio.TaskGroup | None = None
        self._retry_queues: dict[str, float] = {}
        self._started = False
        self._drained = False

    @property
    def task_group(self) -> asyncio.TaskGroup:
        assert self._task_group is not None, "the host is not started"
        return self._task_group

    def route_infos(self) -> list[RouteInfo]:
        return [info for runner in self.runners for info in runner.route_infos()]

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, declare the topology, run `on_start` hooks and begin consuming."""
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        try:
            await self.broker.connect()
            self.broker.add_listener(self._on_connection_change)
            await self.messenger.start()
            for runner in self.runners:
                await runner.declare()
            for runner in self.runners:
                await runner.start()
        except BaseException as exc:
            await self._close(exc)
            raise
        self._started = True

    def _on_connection_change(self, up: bool) -> None:
        if not up:
            self._retry_queues.clear()

    async def retry_queue(self, queue: str, delay_ms: int) -> str:
        """Declare (or refresh) the delay queue that returns messages to `queue` after `delay_ms`."""
        name = names.retry_queue(queue, delay_ms)
        now = time.monotonic()
        if now - self._retry_queues.get(name, -1e9) < _RETRY_QUEUE_REFRESH_S:
            return name
        arguments = {
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
            "x-expires": delay_ms + int(_RETRY_QUEUE_IDLE_S * 1000),
        }
        await self.broker.declare_queue(self.broker.publisher, name, arguments=arguments)
        self._retry_queues[name] = now
        return name

    async def stop(self, timeout_s: float | None = None) -> None:
        """Cancel the consumers, let handlers finish within `timeout_s`, ack, run `on_stop`, close."""
        if self._task_group is None:
            return
        await self.drain(timeout_s)
        await self.close()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop consuming and wait for the handlers in flight; the connection stays open."""
        if self._task_group is None or self._drained:
            return
        self._drained = True
        timeout_s = self.settings.stop_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        for runner in self.runners:
            await runner.cancel_consumers()
        await asyncio.gather(*(runner.drain(deadline) for runner in self.runners))
        for runner in self.runners:
            await runner.stop_hook()

    async def close(self) -> None:
        """Close the connection; call `drain()` first to stop cleanly."""
        await self._close(None)

    async def _close(self, exc: BaseException | None) -> None:
        """Close the connection and end the task group; `exc` is a start-up failure to re-raise as is."""
        task_group, self._task_group = self._task_group, None
        try:
            await self.broker.close()
        finally:
            if task_group is not None:
                if exc is not None:
                    for runner in self.runners:
                        for task in runner.tasks:
                            task.cancel()
                # Passing `exc` in would make the task group wrap it in an ExceptionGroup.
                await task_group.__aexit__(None, None, None)
