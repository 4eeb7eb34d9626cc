"""The benchmark's view of the control exchange: the first sign of life of every process, and events.

A child announces itself with a "ready" message (routing key `ready.*`), an
mrq worker with its first heartbeat (`heartbeat.*`); both carry the pid. The
watch keeps the first such message of each pid with its arrival time
(`time.monotonic()`), the arrival of each worker's latest heartbeat, and
every supervisor event (`event.<node>.<kind>`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aio_pika
import anyio
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

CONNECT_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 30.0
READY_PREFIXES = ("ready.", "heartbeat.")
EVENT_PREFIX = "event."
# Only what the measures read. A catch-all `#` would also route the supervisor's start-up check
# for another supervisor of the same node name (a command to `supervisor.<node>`), which then
# waits for a reply instead of failing at once for want of a route.
BINDINGS = ("ready.#", "heartbeat.#", "event.#")


@dataclass(frozen=True)
class Sighting:
    """The first ready message or heartbeat of one process."""

    pid: int
    routing_key: str
    arrived_s: float
    body: dict[str, Any]


@dataclass(frozen=True)
class EventSighting:
    """A supervisor event: its kind (`instance.unhealthy`, ...), its body and its arrival time."""

    kind: str
    arrived_s: float
    body: dict[str, Any]


class ControlWatch:
    """Consumes everything published to a control exchange and keeps what the measures need."""

    def __init__(self, broker_url: str, control_exchange: str) -> None:
        self.broker_url = broker_url
        self.control_exchange = control_exchange
        self.sightings: dict[int, Sighting] = {}
        # The arrival of the latest heartbeat of each worker pid.
        self.latest_heartbeat: dict[int, float] = {}
        self.events: list[EventSighting] = []
        self._changed = anyio.Event()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> ControlWatch:
        with anyio.fail_after(SETUP_TIMEOUT_S):
            self._connection = await aio_pika.connect(self.broker_url, timeout=CONNECT_TIMEOUT_S)
            self._channel = await self._connection.channel()
            exchange = await self._channel.declare_exchange(
                self.control_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
            for binding in BINDINGS:
                await queue.bind(exchange, binding)
            await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._connection is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_TIMEOUT_S):
                await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        arrived_s = time.monotonic()
        key = message.routing_key or ""
        if key.startswith(READY_PREFIXES):
            self._on_ready(key, message.body, arrived_s)
        elif key.startswith(EVENT_PREFIX):
            kind = key.split(".", 2)[2] if key.count(".") >= 2 else key
            self.events.append(EventSighting(kind, arrived_s, orjson.loads(message.body)))
            self._notify()

    def _on_ready(self, key: str, raw: bytes, arrived_s: float) -> None:
        body = orjson.loads(raw)
        pid = body.get("pid")
        if not isinstance(pid, int):
            return
        if key.startswith("heartbeat."):
            self.latest_heartbeat[pid] = arrived_s
            self._notify()
        if pid in self.sightings:
            return
        self.sightings[pid] = Sighting(pid, key, arrived_s, body)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def forget(self) -> None:
        """Drop every sighting and event: the next fleet starts with a clean slate."""
        self.sightings.clear()
        self.latest_heartbeat.clear()
        self.events.clear()

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until `condition()` holds, checked after every new sighting or event."""
        with anyio.move_on_after(timeout_s):
            while not condition():
                await self._changed.wait()
            return
        raise TimeoutError(
            f"{what} did not happen on exchange {self.control_exchange} within {timeout_s:g} s"
        )

    def ready(self, prefix: str, since_s: float) -> list[Sighting]:
        """Return the sightings whose routing key starts with `prefix` and that arrived after `since_s`."""
        return [
            s for s in self.sightings.values() if s.routing_key.startswith(prefix) and s.arrived_s >= since_s
        ]

    async def wait_ready(self, prefix: str, since_s: float, count: int, timeout_s: float) -> list[Sighting]:
        """Wait for `count` processes to announce themselves after `since_s`; return them by arrival."""
        await self.wait_until(
            lambda: len(self.ready(prefix, since_s)) >= count,
            timeout_s,
            f"{count} processes ready on {prefix}*",
        )
        return sorted(self.ready(prefix, since_s), key=lambda s: s.arrived_s)[:count]

    async def wait_event(self, kind: str, since_s: float, timeout_s: float) -> EventSighting:
        """Wait for the first event of `kind` that arrived after `since_s`."""

        def found() -> EventSighting | None:
            return next((e for e in self.events if e.kind == kind and e.arrived_s >= since_s), None)

        await self.wait_until(lambda: found() is not None, timeout_s, f"event {kind}")
        event = found()
        assert event is not None
        return event

    async def send_to_queue(self, queue: str, body: bytes, content_type: str) -> None:
        """Publish `body` to `queue` through the default exchange."""
        if self._channel is None:
            raise RuntimeError("the watch is not connected; use it as an async context manager")
        message = aio_pika.Message(body, content_type=content_type)
        with anyio.fail_after(SETUP_TIMEOUT_S):
            await self._channel.default_exchange.publish(message, routing_key=queue)
