"""Unit tests of handlers without RabbitMQ: `TestBroker` and its in-memory broker.

`TestBroker` runs services with the real `ServiceHost`, `RouteConsumer` and
`Messenger`, so decoding, validation, replies, retries and dead-lettering are
the same code that runs in production. Only the AMQP connection is replaced:
`MemoryBroker` is a `Broker` whose connection is an in-memory AMQP 0-9-1
server (`MemoryServer`) that behaves like RabbitMQ 3.10 for what mrq uses:

- topic, direct and fanout exchanges and the default exchange;
- durable, exclusive and auto-delete queues. Declaring a queue again with
  other arguments fails like RabbitMQ's PRECONDITION_FAILED, so it becomes
  a `TopologyError`;
- mandatory publishes that match no queue, which raise `NoRoute`;
- direct reply-to (`amq.rabbitmq.reply-to`), consumer prefetch, delivery tags,
  ack, nack and reject with requeue and the redelivered flag, and requeueing
  of unacknowledged deliveries when a channel closes;
- per-queue (`x-message-ttl`) and per-message (`expiration`) TTL, expiring
  at the head of the queue, with dead-lettering through
  `x-dead-letter-exchange` and the `x-death` and `x-first-death-*` headers;
- message properties, which pass through pamqp's encoder and decoder, so
  header values come back with the types a real delivery has.

Not emulated: connection loss and recovery, publisher confirm nacks, queue
expiry (`x-expires`), length limits, priorities, quorum queue delivery limits
and virtual hosts. `tests/test_parity.py` runs the same scenarios on both
brokers and compares the outcomes.

Delays pass in real time. `TestBroker.settle()` also moves the broker's clock
forward to the next expiry once nothing else is left to do, unless the
TestBroker was made with `real_delays=True`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import aiormq
import anyio
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from anyio.abc import TaskGroup
from loguru import logger
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from sdk import codec, names
from sdk.connection import Broker
from sdk.errors import BadMessage, DefinitionError, MrqError
from sdk.messenger import Messenger
from sdk.runtime import ServiceHost
from sdk.service import Service, ServiceSpec, registry
from sdk.settings import SettingsModel, settings

__all__ = [
    "MemoryBroker",
    "MemoryServer",
    "MessageRecord",
    "PublishRecord",
    "QueueNotFound",
    "SettleTimeout",
    "TestBroker",
    "topic_matches",
]

Callback = Callable[[AbstractIncomingMessage], Awaitable[Any]]

_VHOST = "/"
_REPLY_PREFIX = names.DIRECT_REPLY_TO + "."
_EXCHANGE_KINDS = frozenset({"topic", "direct", "fanout"})
_NO_ROUTE = 312


class SettleTimeout(MrqError, TimeoutError):
    """A `TestBroker.settle()` that ran out of time while messages were still in flight."""

    def __init__(self, timeout_s: float, pending: str) -> None:
        self.timeout_s = timeout_s
        self.pending = pending
        super().__init__(
            f"messages still in flight after {timeout_s:g} s ({pending}); a handler may hang, "
            "services may send each other messages in a loop, or with real_delays=True a delay may "
            "be longer than the timeout: find the cause or pass a larger timeout_s"
        )


class QueueNotFound(MrqError, LookupError):
    """A queue name that the in-memory broker does not have."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        super().__init__(
            f"no queue named {name!r} on the test broker; declared queues: {', '.join(sorted(known))}"
        )


# Records that tests read.


@dataclass(frozen=True)
class MessageRecord:
    """A message as the in-memory broker stores it: where it was sent, its body and its properties."""

    exchange: str
    routing_key: str
    raw_body: bytes
    headers: dict[str, Any]
    content_type: str | None
    correlation_id: str | None
    reply_to: str | None
    message_id: str | None
    redelivered: bool = False

    @property
    def body(self) -> Any:
        """The body decoded by its content type, or the raw bytes when they do not decode."""
        try:
            return codec.decode(self.raw_body, self.content_type)
        except BadMessage:
            return self.raw_body


@dataclass(frozen=True)
class PublishRecord(MessageRecord):
    """One publish: the message and the queues it reached (none for an unroutable one)."""

    queues: tuple[str, ...] = ()
    mandatory: bool = False


# The in-memory server.


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Match an AMQP topic binding key: `*` is exactly one word, `#` zero or more."""
    return _match_words(pattern.split("."), routing_key.split("."))


def _match_words(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return head in ("*", words[0]) and _match_words(rest, words[1:])


def _marshal(properties: Basic.Properties, body_size: int) -> bytes:
    return ContentHeader(0, body_size, properties).marshal()


def _unmarshal(data: bytes) -> Basic.Properties:
    header = ContentHeader()
    header.unmarshal(data)
    return header.properties


@dataclass(frozen=True)
class _Envelope:
    """A published message, with its properties kept encoded as on the wire."""

    exchange: str
    routing_key: str
    body: bytes
    header: bytes

    def properties(self) -> Basic.Properties:
        return _unmarshal(self.header)

    def record(self, *, redelivered: bool) -> MessageRecord:
        props = self.properties()
        return MessageRecord(**self._fields(props), redelivered=redelivered)

    def publish_record(self, queues: tuple[str, ...], mandatory: bool) -> PublishRecord:
        props = self.properties()
        return PublishRecord(**self._fields(props), queues=queues, mandatory=mandatory)

    def _fields(self, props: Basic.Properties) -> dict[str, Any]:
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "raw_body": self.body,
            "headers": dict(props.headers or {}),
            "content_type": props.content_type,
            "correlation_id": props.correlation_id,
            "reply_to": props.reply_to,
            "message_id": props.message_id,
        }


@dataclass
class _Entry:
    """A message in one queue."""

    envelope: _Envelope
    expires_at: float | None
    redelivered: bool = False


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: _Queue
    channel: MemoryChannel
    callback: Callback
    no_ack: bool
    unacked: int = 0

    def has_capacity(self) -> bool:
        prefetch = self.channel.prefetch
        return self.no_ack or prefetch == 0 or self.unacked < prefetch


@dataclass(eq=False)
class _Queue:
    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    arguments: dict[str, Any]
    owner: MemoryConnection | None = None
    messages: deque[_Entry] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    cursor: int = 0

    def expiry(self, envelope: _Envelope, now: float) -> float | None:
        ttls_ms = [int(self.arguments["x-message-ttl"])] if "x-message-ttl" in self.arguments else []
        expiration = envelope.properties().expiration
        if expiration is not None:
            ttls_ms.append(int(expiration))
        return now + min(ttls_ms) / 1000 if ttls_ms else None

    def head_expiry(self) -> float | None:
        return self.messages[0].expires_at if self.messages else None

    def next_consumer(self) -> _Consumer | None:
        """Pick the next consumer with room under its prefetch, round robin."""
        count = len(self.consumers)
        for step in range(count):
            consumer = self.consumers[(self.cursor + step) % count]
            if consumer.has_capacity():
                self.cursor = (self.cursor + step + 1) % count
                return consumer
        return None


def _describe(value: Any) -> str:
    return "none" if value is None else f"'{str(value).lower() if isinstance(value, bool) else value}'"


def _inequivalent(name: str, argument: str, received: Any, current: Any) -> Exception:
    return aiormq.exceptions.ChannelPreconditionFailed(
        f"PRECONDITION_FAILED - inequivalent arg '{argument}' for queue '{name}' in vhost '{_VHOST}': "
        f"received {_describe(received)} but current is {_describe(current)}"
    )


def _check_equivalent(queue: _Queue, durable: bool, auto_delete: bool, arguments: dict[str, Any]) -> None:
    """Raise like RabbitMQ when a queue is declared again with other properties."""
    if queue.durable != durable:
        raise _inequivalent(queue.name, "durable", durable, queue.durable)
    if queue.auto_delete != auto_delete:
        raise _inequivalent(queue.name, "auto_delete", auto_delete, queue.auto_delete)
    defaults = {"x-queue-type": "classic"}
    for key in sorted(set(arguments) | set(queue.arguments)):
        received = arguments.get(key, defaults.get(key))
        current = queue.arguments.get(key, defaults.get(key))
        if received != current:
            raise _inequivalent(queue.name, key, received, current)


class MemoryServer:
    """An in-memory AMQP broker (one virtual host) for `MemoryBroker` connections.

    `run()` delivers messages and expires them. Its owner runs it in a task
    group for as long as connections use the server.
    """

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {"": "direct"}
        self.queues: dict[str, _Queue] = {}
        self.bindings: dict[str, list[tuple[str, str]]] = {}
        self.published: list[PublishRecord] = []
        self.channels: set[MemoryChannel] = set()
        self.offset_s = 0.0
        self._reply_queues: dict[str, _Queue] = {}
        self._tags = itertools.count(1)
        self._callbacks_running = 0
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()
        self._task_group: TaskGroup | None = None

    # Clock and notifications.

    def now(self) -> float:
        """Return the broker's clock in seconds: the event loop's clock plus the jumps of `advance_to()`."""
        return anyio.current_time() + self.offset_s

    def advance_to(self, when: float) -> None:
        """Move the clock forward to `when` and expire what is due by then."""
        self.offset_s += max(0.0, when - self.now())
        self._expire_due()
        self.notify()

    def notify(self) -> None:
        """Wake the delivery loop and everyone waiting for a change."""
        self._wakeup.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def changed(self) -> asyncio.Event:
        """Return an event that is set at the next change of state."""
        return self._changed

    # Delivery loop.

    async def run(self) -> None:
        """Deliver ready messages and expire old ones until cancelled."""
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            try:
                while True:
                    self._wakeup.clear()
                    self._expire_due()
                    self._deliver_ready()
                    await self._sleep()
            finally:
                self._task_group = None

    async def _sleep(self) -> None:
        due = self.next_expiry()
        delay_s = None if due is None else max(0.0, due - self.now())
        with anyio.move_on_after(delay_s):
            await self._wakeup.wait()

    def _deliver_ready(self) -> None:
        for queue in list(self.queues.values()) + list(self._reply_queues.values()):
            while queue.messages and queue.consumers:
                if self._expire_head(queue):
                    continue
                consumer = queue.next_consumer()
                if consumer is None:
                    break
                self._deliver(consumer, queue.messages.popleft())

    def _deliver(self, consumer: _Consumer, entry: _Entry) -> None:
        assert self._task_group is not None, "the server is not running"
        channel = consumer.channel
        tag = channel.next_delivery_tag()
        if not consumer.no_ack:
            channel.unacked[tag] = (consumer, entry)
            consumer.unacked += 1
        message = _incoming(consumer, tag, entry)
        self._callbacks_running += 1
        self._task_group.start_soon(self._invoke, consumer, message)

    async def _invoke(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        try:
            await consumer.callback(message)
        except Exception:
            logger.exception("consumer callback failed queue={} tag={}", consumer.queue.name, consumer.tag)
        finally:
            self._callbacks_running -= 1
            self.notify()

    # Expiry and dead-lettering.

    def next_expiry(self) -> float | None:
        """Return when the next message expires at the head of its queue, if any has a TTL."""
        due = [q.head_expiry() for q in self.queues.values()]
        return min((d for d in due if d is not None), default=None)

    def _expire_due(self) -> None:
        expired = False
        for queue in list(self.queues.values()):
            while self._expire_head(queue):
                expired = True
        if expired:
            self.notify()

    def _expire_head(self, queue: _Queue) -> bool:
        """Expire the head of `queue` if its time is up. As in RabbitMQ, only the head of a queue expires."""
        due = queue.head_expiry()
        if due is None or due > self.now():
            return False
        self._dead_letter(queue, queue.messages.popleft().envelope, "expired")
        return True

    def _dead_letter(self, queue: _Queue, envelope: _Envelope, reason: str) -> None:
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None or exchange not in self.exchanges:
            return
        routing_key = queue.arguments.get("x-dead-letter-routing-key", envelope.routing_key)
        props = _with_death(envelope, queue.name, reason)
        dead = _Envelope(exchange, routing_key, envelope.body, _marshal(props, len(envelope.body)))
        for target in self._route(exchange, routing_key):
            self._enqueue(target, dead)

    # Topology.

    def declare_exchange(self, name: str, kind: str) -> None:
        if kind not in _EXCHANGE_KINDS:
            raise NotImplementedError(
                f"exchange {name!r} has type {kind!r}, which the in-memory broker does not route; "
                f"use one of {', '.join(sorted(_EXCHANGE_KINDS))}"
            )
        current = self.exchanges.setdefault(name, kind)
        if current != kind:
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost "
                f"'{_VHOST}': received '{kind}' but current is '{current}'"
            )

    def declare_queue(
        self,
        connection: MemoryConnection,
        name: str,
        *,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: Mapping[str, Any] | None,
    ) -> _Queue:
        # NOTE: x-expires is stored but not enforced, so an unused queue is never deleted.
        name = name or f"amq.gen-{os.urandom(11).hex()}"
        args = dict(arguments or {})
        queue = self.queues.get(name)
        if queue is None:
            owner = connection if exclusive else None
            queue = _Queue(name, durable, exclusive, auto_delete, args, owner)
            self.queues[name] = queue
            return queue
        if queue.exclusive and queue.owner is not connection:
            raise aiormq.exceptions.ChannelLockedResource(
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' "
                f"in vhost '{_VHOST}'"
            )
        _check_equivalent(queue, durable, auto_delete, args)
        return queue

    def existing_queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise aiormq.exceptions.ChannelNotFoundEntity(
                f"NOT_FOUND - no queue '{name}' in vhost '{_VHOST}'"
            )
        return queue

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        if exchange == "":
            raise aiormq.exceptions.ChannelAccessRefused(
                "ACCESS_REFUSED - operation not permitted on the default exchange"
            )
        if exchange not in self.exchanges:
            raise aiormq.exceptions.ChannelNotFoundEntity(
                f"NOT_FOUND - no exchange '{exchange}' in vhost '{_VHOST}'"
            )
        self.existing_queue(queue)
        bindings = self.bindings.setdefault(exchange, [])
        if (routing_key, queue) not in bindings:
            bindings.append((routing_key, queue))

    def delete_queue(self, name: str) -> None:
        self.queues.pop(name, None)
        for exchange, bindings in self.bindings.items():
            self.bindings[exchange] = [(key, queue) for key, queue in bindings if queue != name]
        self.notify()

    # Publishing.

    def publish(
        self,
        channel: MemoryChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Basic.Properties,
        mandatory: bool,
    ) -> None:
        """Route a message to its queues. Raise `PublishError` (NO_ROUTE) for an unroutable mandatory one."""
        if exchange not in self.exchanges:
            raise aiormq.exceptions.ChannelNotFoundEntity(
                f"NOT_FOUND - no exchange '{exchange}' in vhost '{_VHOST}'"
            )
        # A copy, so that rewriting reply_to leaves the caller's properties alone.
        props = copy.copy(properties)
        if props.reply_to == names.DIRECT_REPLY_TO:
            props.reply_to = channel.reply_address()
        envelope = _Envelope(exchange, routing_key, body, _marshal(props, len(body)))
        targets = self._route(exchange, routing_key)
        queues = tuple(queue.name for queue in targets)
        self.published.append(envelope.publish_record(queues, mandatory))
        if not targets and mandatory:
            raise _no_route(channel, envelope)
        for queue in targets:
            self._enqueue(queue, envelope)

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self.queues.get(routing_key) or self._reply_queues.get(routing_key)
            return [queue] if queue is not None else []
        kind = self.exchanges[exchange]
        found: dict[str, _Queue] = {}
        for key, name in self.bindings.get(exchange, []):
            matches = kind == "fanout" or (
                topic_matches(key, routing_key) if kind == "topic" else key == routing_key
            )
            if matches and name in self.queues:
                found.setdefault(name, self.queues[name])
        return list(found.values())

    def _enqueue(self, queue: _Queue, envelope: _Envelope) -> None:
        queue.messages.append(_Entry(envelope, queue.expiry(envelope, self.now())))
        self.notify()

    # Consumers and acknowledgements.

    def consume(self, channel: MemoryChannel, queue: _Queue, callback: Callback, no_ack: bool) -> str:
        tag = f"ctag.{next(self._tags)}"
        queue.consumers.append(_Consumer(tag, queue, channel, callback, no_ack))
        channel.consumers[tag] = queue
        self.notify()
        return tag

    def consume_replies(self, channel: MemoryChannel, callback: Callback, no_ack: bool) -> str:
        """Start the direct reply-to consumer of `channel`."""
        if not no_ack:
            raise aiormq.exceptions.ChannelPreconditionFailed(
                "PRECONDITION_FAILED - reply consumer cannot acknowledge"
            )
        address = channel.reply_address(create=True)
        queue = _Queue(address, durable=False, exclusive=True, auto_delete=True, arguments={})
        self._reply_queues[address] = queue
        return self.consume(channel, queue, callback, no_ack)

    def cancel(self, channel: MemoryChannel, tag: str) -> None:
        queue = channel.consumers.pop(tag, None)
        if queue is None:
            return
        queue.consumers = [c for c in queue.consumers if c.tag != tag]
        if not queue.consumers:
            if self._reply_queues.get(queue.name) is queue:
                del self._reply_queues[queue.name]
                channel.reply_token = None
            elif queue.auto_delete:
                self.delete_queue(queue.name)
        self.notify()

    def ack(self, channel: MemoryChannel, delivery_tag: int, multiple: bool) -> None:
        self._pop_unacked(channel, delivery_tag, multiple)
        self.notify()

    def nack(self, channel: MemoryChannel, delivery_tag: int, multiple: bool, requeue: bool) -> None:
        for consumer, entry in reversed(self._pop_unacked(channel, delivery_tag, multiple)):
            self._return(consumer.queue, entry, requeue)
        self.notify()

    def _pop_unacked(
        self, channel: MemoryChannel, delivery_tag: int, multiple: bool
    ) -> list[tuple[_Consumer, _Entry]]:
        """Remove deliveries from the unacknowledged ones, as an ack, nack or reject does."""
        if multiple:
            tags = sorted(t for t in channel.unacked if delivery_tag == 0 or t <= delivery_tag)
        elif delivery_tag in channel.unacked:
            tags = [delivery_tag]
        else:
            # NOTE: RabbitMQ also closes the channel here, but this broker keeps it open.
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"
            )
        settled = [channel.unacked.pop(tag) for tag in tags]
        for consumer, _entry in settled:
            consumer.unacked -= 1
        return settled

    def _return(self, queue: _Queue, entry: _Entry, requeue: bool) -> None:
        """Put back a delivery that was not acknowledged, or dead-letter it."""
        if self.queues.get(queue.name) is not queue:
            return
        if requeue:
            entry.redelivered = True
            queue.messages.appendleft(entry)
        else:
            self._dead_letter(queue, entry.envelope, "rejected")

    def close_channel(self, channel: MemoryChannel) -> None:
        """Cancel the consumers of a closing channel and requeue its unacknowledged deliveries."""
        for consumer_tag in list(channel.consumers):
            self.cancel(channel, consumer_tag)
        for delivery_tag in sorted(channel.unacked, reverse=True):
            consumer, entry = channel.unacked.pop(delivery_tag)
            consumer.unacked -= 1
            self._return(consumer.queue, entry, requeue=True)
        self.channels.discard(channel)
        self.notify()

    def close_connection(self, connection: MemoryConnection) -> None:
        for channel in list(connection.channels):
            channel.close_now()
        for queue in [q for q in self.queues.values() if q.owner is connection]:
            self.delete_queue(queue.name)

    # State for TestBroker.

    def quiet(self) -> bool:
        """Return True when no delivery is unacknowledged or pending and no message is due to expire."""
        if self._callbacks_running or any(channel.unacked for channel in self.channels):
            return False
        now = self.now()
        for queue in list(self.queues.values()) + list(self._reply_queues.values()):
            due = queue.head_expiry()
            if queue.messages and (queue.consumers or (due is not None and due <= now)):
                return False
        return True

    def describe_pending(self) -> str:
        unacked: dict[str, int] = {}
        for channel in self.channels:
            for consumer, _entry in channel.unacked.values():
                unacked[consumer.queue.name] = unacked.get(consumer.queue.name, 0) + 1
        ready = {q.name: len(q.messages) for q in self.queues.values() if q.messages and q.consumers}
        timed = sorted(q.name for q in self.queues.values() if q.head_expiry() is not None)
        parts = [f"unacked {_counts(unacked)}", f"ready {_counts(ready)}"]
        if timed:
            parts.append(f"waiting for a TTL in {', '.join(timed)}")
        return "; ".join(parts)

    def connect(self, name: str) -> MemoryConnection:
        return MemoryConnection(self, name)


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in sorted(counts.items())) or "none"


def _with_death(envelope: _Envelope, queue: str, reason: str) -> Basic.Properties:
    """Return the properties of a dead-lettered copy: `x-death` updated, `expiration` removed."""
    props = envelope.properties()
    headers: dict[str, Any] = dict(cast(Mapping[str, Any], props.headers or {}))
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    deaths: list[dict[str, Any]] = [dict(entry) for entry in headers.get("x-death") or []]
    same = next((e for e in deaths if e.get("queue") == queue and e.get("reason") == reason), None)
    if same is not None:
        deaths.remove(same)
        same["count"] = int(same.get("count", 0)) + 1
        deaths.insert(0, same)
    else:
        entry: dict[str, Any] = {
            "count": 1,
            "reason": reason,
            "queue": queue,
            "time": now,
            "exchange": envelope.exchange,
            "routing-keys": [envelope.routing_key],
        }
        if props.expiration is not None:
            entry["original-expiration"] = props.expiration
        deaths.insert(0, entry)
    headers["x-death"] = deaths
    headers.setdefault("x-first-death-exchange", envelope.exchange)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-reason", reason)
    props.headers = headers
    props.expiration = None
    return props


def _incoming(consumer: _Consumer, tag: int, entry: _Entry) -> AbstractIncomingMessage:
    envelope = entry.envelope
    delivery = Basic.Deliver(
        consumer_tag=consumer.tag,
        delivery_tag=tag,
        redelivered=entry.redelivered,
        exchange=envelope.exchange,
        routing_key=envelope.routing_key,
    )
    delivered = DeliveredMessage(
        delivery=delivery,
        header=ContentHeader(0, len(envelope.body), envelope.properties()),
        body=envelope.body,
        channel=cast(aiormq.abc.AbstractChannel, consumer.channel),
    )
    return aio_pika.IncomingMessage(delivered, no_ack=consumer.no_ack)


def _no_route(channel: MemoryChannel, envelope: _Envelope) -> aiormq.exceptions.PublishError:
    frame = Basic.Return(
        reply_code=_NO_ROUTE,
        reply_text="NO_ROUTE",
        exchange=envelope.exchange,
        routing_key=envelope.routing_key,
    )
    returned = DeliveredMessage(
        delivery=frame,
        header=ContentHeader(0, len(envelope.body), envelope.properties()),
        body=envelope.body,
        channel=cast(aiormq.abc.AbstractChannel, channel),
    )
    return aiormq.exceptions.PublishError(returned, frame)


# The client side: connection, channel and queue objects with the aio-pika methods mrq calls.


class MemoryConnection:
    """A connection to a `MemoryServer`, standing in for aio-pika's robust connection."""

    # aio-pika's IncomingMessage.nack() checks this server capability.
    basic_nack = True

    def __init__(self, server: MemoryServer, name: str) -> None:
        self.server = server
        self.name = name
        self.channels: list[MemoryChannel] = []
        self.close_callbacks: set[Callable[..., Any]] = set()
        self.reconnect_callbacks: set[Callable[..., Any]] = set()
        self.is_closed = False
        self._channel_numbers = itertools.count(1)

    async def channel(self, publisher_confirms: bool = True, on_return_raises: bool = False) -> MemoryChannel:
        if self.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the connection is closed")
        channel = MemoryChannel(self, next(self._channel_numbers))
        self.channels.append(channel)
        self.server.channels.add(channel)
        return channel

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.server.close_connection(self)


class MemoryChannel:
    """A channel of a `MemoryConnection`, serving as both aio-pika's channel and aiormq's underlying one."""

    def __init__(self, connection: MemoryConnection, number: int) -> None:
        self.connection = connection
        self.server = connection.server
        self.number = number
        self.prefetch = 0
        self.consumers: dict[str, _Queue] = {}
        self.unacked: dict[int, tuple[_Consumer, _Entry]] = {}
        self.reply_token: str | None = None
        self._closed = False
        self._delivery_tags = itertools.count(1)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def next_delivery_tag(self) -> int:
        return next(self._delivery_tags)

    def reply_address(self, *, create: bool = False) -> str:
        """Return this channel's direct reply-to address.

        Publishing a call from a channel without a reply consumer fails as in RabbitMQ, so only
        `create=True` (from the reply consumer) makes a new address.
        """
        if self.reply_token is None:
            if not create:
                raise aiormq.exceptions.ChannelPreconditionFailed(
                    "PRECONDITION_FAILED - fast reply consumer does not exist"
                )
            self.reply_token = os.urandom(12).hex()
        return _REPLY_PREFIX + self.reply_token

    def check_open(self) -> None:
        if self._closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"channel {self.number} is closed")

    async def get_underlay_channel(self) -> MemoryChannel:
        self.check_open()
        return self

    async def set_qos(self, prefetch_count: int = 0, **_options: Any) -> None:
        self.check_open()
        self.prefetch = prefetch_count

    async def declare_exchange(self, name: str, type: str = "direct", **_options: Any) -> str:
        self.check_open()
        self.server.declare_exchange(name, str(type))
        return name

    async def declare_queue(
        self,
        name: str | None = None,
        *,
        durable: bool = False,
        exclusive: bool = False,
        passive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> MemoryQueue:
        self.check_open()
        if name == names.DIRECT_REPLY_TO:
            return MemoryQueue(self, name)
        if passive:
            return MemoryQueue(self, self.server.existing_queue(name or "").name)
        queue = self.server.declare_queue(
            self.connection,
            name or "",
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments=arguments,
        )
        return MemoryQueue(self, queue.name)

    async def basic_publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Basic.Properties | None = None,
        mandatory: bool = False,
        immediate: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.check_open()
        self.server.publish(self, exchange, routing_key, body, properties or Basic.Properties(), mandatory)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.check_open()
        self.server.ack(self, delivery_tag, multiple)

    async def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.check_open()
        self.server.nack(self, delivery_tag, multiple, requeue)

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self.check_open()
        self.server.nack(self, delivery_tag, False, requeue)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.server.close_channel(self)


class MemoryQueue:
    """A declared queue as aio-pika's queue object: bind, consume, cancel."""

    def __init__(self, channel: MemoryChannel, name: str) -> None:
        self.channel = channel
        self.name = name

    async def bind(self, exchange: Any, routing_key: str | None = None, **_options: Any) -> None:
        self.channel.check_open()
        exchange_name = exchange if isinstance(exchange, str) else exchange.name
        self.channel.server.bind(self.name, exchange_name, self.name if routing_key is None else routing_key)

    async def consume(self, callback: Callback, no_ack: bool = False, **_options: Any) -> str:
        channel = self.channel
        channel.check_open()
        if self.name == names.DIRECT_REPLY_TO:
            return channel.server.consume_replies(channel, callback, no_ack)
        queue = channel.server.existing_queue(self.name)
        return channel.server.consume(channel, queue, callback, no_ack)

    async def cancel(self, consumer_tag: str, **_options: Any) -> None:
        self.channel.check_open()
        self.channel.server.cancel(self.channel, consumer_tag)


class MemoryBroker(Broker):
    """A `Broker` whose connection goes to a `MemoryServer` instead of RabbitMQ."""

    def __init__(self, server: MemoryServer, settings: SettingsModel, *, connection_name: str) -> None:
        super().__init__(settings, connection_name=connection_name)
        self.server = server

    async def open_connection(self) -> AbstractRobustConnection:
        # MemoryConnection implements the part of the robust connection that Broker uses.
        return cast(AbstractRobustConnection, self.server.connect(self.connection_name))


# The test API.


def _select_specs(
    classes: tuple[type[Service], ...], service_names: Iterable[str] | None, resolved: SettingsModel
) -> list[ServiceSpec]:
    specs = registry.specs(resolved.service_name)
    if not classes and service_names is None:
        return specs
    requested = set(service_names or ())
    for cls in classes:
        name = cls.__dict__.get("name")
        if not name:
            raise DefinitionError(f"{cls.__qualname__} has no service name: set its class attribute `name`")
        requested.add(name)
    known = {spec.name for spec in specs}
    missing = sorted(requested - known)
    if missing:
        raise DefinitionError(
            f"no registered service named {', '.join(missing)}; registered services: "
            f"{', '.join(sorted(known)) or 'none'}; import the module that defines it "
            "before creating the TestBroker"
        )
    return [spec for spec in specs if spec.name in requested]


class TestBroker:
    """An in-memory broker that runs services in this process, for unit tests of handlers.

    Without arguments it serves every registered service. Pass service
    classes or `services=[names]` to serve some. Keyword arguments override
    settings as for `Client` (`exchange`, `retries`, `retry_delay_s`, ...)::

        async with TestBroker(Billing) as broker:
            reply = await broker.call("billing.charge", {"amount": 3})
            await broker.send("billing.refund", {"amount": 3})
            await broker.settle()
            assert broker.dead_letters("billing.refund") == []
    """

    # Not a test class, although pytest collects classes named Test*.
    __test__ = False

    def __init__(
        self,
        *classes: type[Service],
        services: Iterable[str] | None = None,
        real_delays: bool = False,
        settle_timeout_s: float = 30.0,
        **overrides: Any,
    ) -> None:
        self.settings: SettingsModel = settings.resolve(**overrides)
        self.specs = _select_specs(classes, services, self.settings)
        self.real_delays = real_delays
        self.settle_timeout_s = settle_timeout_s
        self.server = MemoryServer()
        self.host = ServiceHost(self.specs, self.settings, role="test", broker=self._broker("services"))
        self.messenger = Messenger(self._broker("client"))
        self._stack: AsyncExitStack | None = None

    def _broker(self, role: str) -> MemoryBroker:
        return MemoryBroker(self.server, self.settings, connection_name=f"mrq test {role} pid={os.getpid()}")

    async def __aenter__(self) -> TestBroker:
        stack = AsyncExitStack()
        try:
            task_group = await stack.enter_async_context(anyio.create_task_group())
            task_group.start_soon(self.server.run)
            stack.callback(task_group.cancel_scope.cancel)
            await self.host.start()
            stack.push_async_callback(self.host.stop)
            await self.messenger.broker.connect()
            stack.push_async_callback(self.messenger.broker.close)
            await self.messenger.start()
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        logger.debug("test broker started services={}", ",".join(spec.name for spec in self.specs))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            # Closed without the body's exception, which an anyio task group would wrap in an
            # ExceptionGroup. Python re-raises that exception unchanged after this returns.
            await stack.aclose()

    # Sending, like Client.

    async def send(self, target: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Send a one-way message to `target`. Raise NoRoute when no queue is bound to it."""
        await self.messenger.send(target, body, headers=headers)

    async def call(
        self,
        target: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call `target` and return its reply. Raise RemoteError, NoRoute or RpcTimeout."""
        return await self.messenger.call(target, body, timeout=timeout, headers=headers)

    async def emit(self, event: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish an event to every subscriber. An event without subscribers is dropped."""
        await self.messenger.emit(event, body, headers=headers)

    # Waiting and looking.

    async def settle(self, timeout_s: float | None = None) -> None:
        """Run until no message is in flight and none waits for a TTL (retries, expiring calls).

        Without `real_delays`, the broker's clock jumps to the next expiry
        whenever nothing else is left to do, so long retry delays take no time.
        Raise SettleTimeout after `timeout_s` (default: `settle_timeout_s`).
        """
        if self._stack is None:
            raise RuntimeError(
                "the TestBroker is not running; use it as `async with TestBroker() as broker:`"
            )
        timeout_s = self.settle_timeout_s if timeout_s is None else timeout_s
        try:
            with anyio.fail_after(timeout_s):
                await self._settle()
        except TimeoutError:
            raise SettleTimeout(timeout_s, self.server.describe_pending()) from None

    async def _settle(self) -> None:
        while True:
            changed = self.server.changed()
            if not self.server.quiet():
                await changed.wait()
                continue
            busy = next((runner for runner in self.host.runners if not runner.idle.is_set()), None)
            if busy is not None:
                await busy.idle.wait()
                continue
            due = self.server.next_expiry()
            if due is None:
                return
            if self.real_delays:
                await changed.wait()
            else:
                self.server.advance_to(due)

    def queue(self, name: str) -> list[MessageRecord]:
        """Return the messages waiting in queue `name`, oldest first (unacknowledged ones excluded)."""
        queue = self.server.queues.get(name)
        if queue is None:
            raise QueueNotFound(name, self.server.queues)
        return [entry.envelope.record(redelivered=entry.redelivered) for entry in queue.messages]

    def dead_letters(self, queue: str) -> list[MessageRecord]:
        """Return the messages in the dead-letter queue of `queue` (a route such as "billing.charge")."""
        return self.queue(names.dead_queue(queue))

    @property
    def published(self) -> list[PublishRecord]:
        """Every publish so far, in order: requests, replies, events, retries and dead letters."""
        return list(self.server.published)
