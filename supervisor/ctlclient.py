"""The client side of the control plane: find the broker and the key, send commands, gather replies.

The CLI uses it, and so does a starting supervisor to ask whether its node
name is taken. A command goes to `supervisor.<node>` or `supervisor.all` on
the control exchange, signed with the cluster key and published mandatory, so
that a node that is not running is reported at once (`NoRoute`). Replies come
back over RabbitMQ's direct reply-to, each verified with the same key.

The signed command names its routing key (`target`), so that no other node
accepts a captured copy. It expires when the sender stops waiting for the first
reply (`expires_at`), so that a node that was frozen meanwhile does not run it
later. A node checks the expiry before it starts a command, not while it runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from loguru import logger
from pydantic import ValidationError

from sdk import names, signing
from sdk.codec import JSON
from sdk.connection import Broker
from sdk.errors import BrokerUnavailable, MrqError, NoRoute, SignatureError
from sdk.settings import settings as sdk_settings
from sdk.wire import Event, Reply, WireError, decode
from supervisor import keys
from supervisor.broker import LOCAL_BROKER_URL, probe_amqp
from supervisor.config import (
    BROKER_AUTO,
    ENV_OVERRIDES,
    ConfigError,
    SupervisorSettings,
    load_supervisor_settings,
)
from supervisor.registry import Registry, RegistryError, registry_path

__all__ = [
    "PRIVATE_BROKER_META_KEY",
    "ClientError",
    "ControlClient",
    "Gathered",
    "connect",
    "follow_events",
    "load_client_settings",
    "resolve_client_broker",
]

PRIVATE_BROKER_META_KEY: Final = "private_broker_url"
PROBE_TIMEOUT_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 5.0
PUBLISH_TIMEOUT_S: Final = 5.0
_EVENT_BACKLOG: Final = 10_000

# How long a command for all nodes waits for replies from nodes that no reply names.
BROADCAST_MIN_WAIT_S = 0.3


class ClientError(MrqError):
    """The CLI cannot find its settings, the broker or the key; the message names what to change."""


def load_client_settings(
    config_path: Path, *, explicit: bool, env: Mapping[str, str] | None = None
) -> SupervisorSettings:
    """Return the [supervisor] settings from the file, or from the MRQ_* variables when it is absent.

    A missing file is an error only when the caller named it (`explicit`).
    """
    environ = os.environ if env is None else env
    if config_path.exists() or explicit:
        try:
            return load_supervisor_settings(config_path, environ)
        except ConfigError as exc:
            raise ClientError(f"invalid configuration: {exc}") from exc
    values = {key: environ[variable] for variable, key in ENV_OVERRIDES.items() if variable in environ}
    if not values:
        raise ClientError(
            f"no {config_path} here and no MRQ_* variables: pass the supervisor's file with "
            "-c PATH/TO/supervisor.toml, or set MRQ_EXCHANGE, MRQ_BROKER_URL and MRQ_CLUSTER_KEY"
        )
    try:
        return SupervisorSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ClientError(
            f"invalid MRQ_* environment variables: {problems}; correct them or pass -c supervisor.toml"
        ) from None


async def resolve_client_broker(settings: SupervisorSettings) -> str:
    """Return the broker URL: the setting, or for "auto" this host's private node or local broker.

    A supervisor that started a private RabbitMQ node stores its URL in the registry
    meta key `private_broker_url`, which is used when a broker still runs there.
    """
    if settings.broker != BROKER_AUTO:
        return settings.broker
    path = registry_path(settings.state_dir)
    if path.exists():
        private = await _stored_private_url(path)
        if private and await probe_amqp(private, PROBE_TIMEOUT_S):
            return private
    return LOCAL_BROKER_URL


async def _stored_private_url(path: Path) -> str | None:
    try:
        async with Registry(path) as registry:
            return await registry.get_meta(PRIVATE_BROKER_META_KEY)
    except RegistryError as exc:
        logger.debug("registry not readable path={} error={}", path, exc)
        return None


async def connect(settings: SupervisorSettings) -> tuple[Broker, bytes]:
    """Connect to the cluster's broker and return it with the cluster key."""
    try:
        key = keys.load_for_client(settings)
    except keys.KeyError_ as exc:
        raise ClientError(str(exc)) from None
    url = await resolve_client_broker(settings)
    resolved = sdk_settings.resolve(
        broker_url=url,
        exchange=settings.exchange,
        cluster_key=key.decode(),
        publish_timeout_s=PUBLISH_TIMEOUT_S,
        connect_timeout_s=CONNECT_TIMEOUT_S,
    )
    broker = Broker(resolved, connection_name=f"mrq-supervisor cli pid={os.getpid()}")
    try:
        await broker.connect()
    except BrokerUnavailable as exc:
        raise ClientError(str(exc)) from None
    return broker, key


@dataclass
class Gathered:
    """The replies to one command.

    `replies` holds each node's final reply. `missing` lists the nodes that some
    reply named as known but that did not answer within the timeout, and `unfinished`
    those that acknowledged the command but sent no final reply in time.
    """

    command_id: str
    replies: dict[str, Reply] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    known: set[str] = field(default_factory=set)


class ControlClient:
    """Sends signed commands on the control exchange and collects the signed replies."""

    def __init__(self, broker: Broker, key: bytes, *, sender: str | None = None) -> None:
        self.broker = broker
        self.key = key
        self.sender = sender or f"cli {os.getlogin() if _has_login() else 'unknown'}@{socket.gethostname()}"
        self.exchange = broker.settings.control_exchange
        self.rejected_replies = 0
        self._channel: AbstractRobustChannel | None = None
        self._waiting: dict[str, asyncio.Queue[Reply]] = {}

    async def start(self) -> None:
        """Declare the control exchange, open the channel that publishes commands and receives replies."""
        await self.broker.declare_exchange(self.exchange)
        channel = await self.broker.connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(names.DIRECT_REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)
        self._channel = channel

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await asyncio.wait_for(channel.close(), PUBLISH_TIMEOUT_S)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._waiting.get(message.correlation_id or "")
        if waiting is None:
            return
        try:
            reply = signing.verify_reply(self.key, message.body, message.headers)
        except SignatureError as exc:
            self.rejected_replies += 1
            logger.warning("reply rejected reason={}", exc)
            return
        waiting.put_nowait(reply)

    async def publish(
        self,
        name: str,
        args: Mapping[str, Any],
        *,
        node: str | None,
        ttl_s: float,
        correlation_id: str | None = None,
    ) -> str:
        """Publish a signed command and return its correlation id; raise NoRoute when no queue receives it.

        The command must not start after `ttl_s` seconds.
        """
        if self._channel is None:
            raise RuntimeError("the control client is not started; call start() first")
        key = names.supervisor_command_key(node)
        # NOTE: the receiver compares expires_at with its own clock, so a clock that runs
        # ahead of the sender's by more than ttl_s rejects every command as expired.
        command = signing.make_command(name, args, sender=self.sender, target=key, ttl_s=ttl_s)
        body = command.to_json()
        correlation_id = correlation_id or self.broker.next_id()
        properties = self.broker.properties(
            content_type=JSON,
            headers=signing.sign_headers(self.key, body),
            correlation_id=correlation_id,
            reply_to=names.DIRECT_REPLY_TO,
            persistent=False,
            expiration_ms=max(int(ttl_s * 1000), 1),
        )
        underlay = await asyncio.wait_for(self._channel.get_underlay_channel(), PUBLISH_TIMEOUT_S)
        try:
            await underlay.basic_publish(
                body,
                exchange=self.exchange,
                routing_key=key,
                properties=properties,
                mandatory=True,
                timeout=PUBLISH_TIMEOUT_S,
            )
        except aiormq.exceptions.PublishError as exc:
            if getattr(exc.frame, "reply_code", None) == 312:
                raise NoRoute(self.exchange, key) from None
            raise
        return correlation_id

    async def gather(
        self,
        name: str,
        args: Mapping[str, Any],
        *,
        node: str | None = None,
        timeout_s: float = 3.0,
        wait_s: float = 120.0,
        min_wait_s: float | None = None,
    ) -> Gathered:
        """Send a command to one node (or all) and collect the replies.

        Every node gets `timeout_s` to answer; a node that acknowledged the command
        gets `wait_s` more for its final reply. Collecting ends early once every node
        that a reply named as known has answered, but not before `min_wait_s`. Its
        default for all nodes is `BROADCAST_MIN_WAIT_S`, for a node that started so
        recently that the others do not know it yet.
        Raises NoRoute when no supervisor (or not the named one) is running.
        """
        if min_wait_s is None:
            min_wait_s = 0.0 if node else min(BROADCAST_MIN_WAIT_S, timeout_s)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        correlation_id = self.broker.next_id()
        self._waiting[correlation_id] = queue
        try:
            await self.publish(name, args, node=node, ttl_s=timeout_s, correlation_id=correlation_id)
            return await self._collect(queue, correlation_id, node, (timeout_s, wait_s, min_wait_s))
        finally:
            self._waiting.pop(correlation_id, None)

    async def _collect(
        self,
        queue: asyncio.Queue[Reply],
        correlation_id: str,
        node: str | None,
        limits_s: tuple[float, float, float],
    ) -> Gathered:
        timeout_s, wait_s, min_wait_s = limits_s
        loop = asyncio.get_running_loop()
        gathered = Gathered(command_id=correlation_id, known={node} if node else set())
        answered: set[str] = set()
        began = loop.time()
        deadline = began + timeout_s
        while not (gathered.known and gathered.known <= answered and loop.time() >= began + min_wait_s):
            reply = await _next(queue, deadline - loop.time())
            if reply is None:
                break
            self._take(gathered, answered, reply, node)
        unfinished = answered - set(gathered.replies)
        deadline = loop.time() + wait_s
        while unfinished:
            reply = await _next(queue, deadline - loop.time())
            if reply is None:
                break
            self._take(gathered, answered, reply, node)
            unfinished = answered - set(gathered.replies)
        gathered.missing = sorted(gathered.known - answered)
        gathered.unfinished = sorted(unfinished)
        return gathered

    @staticmethod
    def _take(gathered: Gathered, answered: set[str], reply: Reply, node: str | None) -> None:
        if node is not None and reply.node != node:
            return
        answered.add(reply.node)
        result = reply.result if isinstance(reply.result, dict) else {}
        if node is None:
            gathered.known.update(str(n) for n in result.get("known_nodes") or [])
        gathered.known.add(reply.node)
        if not (reply.ok and result.get("pending") is True):
            gathered.replies[reply.node] = reply


async def _next(queue: asyncio.Queue[Reply], remaining_s: float) -> Reply | None:
    if remaining_s <= 0:
        return None if queue.empty() else queue.get_nowait()
    try:
        return await asyncio.wait_for(queue.get(), remaining_s)
    except TimeoutError:
        return None


def _has_login() -> bool:
    try:
        os.getlogin()
    except OSError:
        return False
    return True


async def follow_events(
    broker: Broker, key: bytes, on_ready: Callable[[], None] | None = None
) -> AsyncIterator[Event]:
    """Yield the supervisor events of every node as they are published, verifying each signature.

    `on_ready` is called once the queue is bound, so no event published after it is missed.
    Unsigned or forged events are dropped with a warning. The iterator runs until
    the caller stops iterating; close it with `aclose()`.
    """
    exchange = broker.settings.control_exchange
    await broker.declare_exchange(exchange)
    channel = await broker.channel()
    incoming: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue(_EVENT_BACKLOG)

    async def on_message(message: AbstractIncomingMessage) -> None:
        if not incoming.full():
            incoming.put_nowait(message)

    try:
        queue = await broker.declare_queue(channel, "", durable=False, exclusive=True, auto_delete=True)
        await queue.bind(exchange, names.EVENT_PREFIX + "#")
        await queue.consume(on_message, no_ack=True)
        if on_ready is not None:
            on_ready()
        while True:
            event = _verified_event(key, await incoming.get())
            if event is not None:
                yield event
    finally:
        if not channel.is_closed:
            await asyncio.wait_for(channel.close(), PUBLISH_TIMEOUT_S)


def _verified_event(key: bytes, message: AbstractIncomingMessage) -> Event | None:
    try:
        signing.check_signature(key, message.body, message.headers)
        event = decode(message.body)
    except (SignatureError, WireError) as exc:
        logger.warning("event rejected routing_key={} reason={}", message.routing_key, exc)
        return None
    if not isinstance(event, Event):
        logger.warning("event rejected routing_key={} reason=not an event", message.routing_key)
        return None
    return event
