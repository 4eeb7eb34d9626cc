"""The control server: signed commands from the CLI and other nodes, executed on this node.

Commands arrive on the control exchange with routing key `supervisor.<node>`
or `supervisor.all`, in an exclusive, non-durable queue. A command for a node
that is not running has no queue to go to, so the sender's mandatory publish
fails at once, and no command waits in the broker to run late. Each command
is verified (`sdk.signing.CommandVerifier`) before anything runs: besides the
signature, its age and its nonce, it must be addressed to one of this node's two
routing keys, not expired, and issued after this supervisor started. The signed
reply goes to `reply_to` with the command's correlation id; its `result` is a
JSON object that always carries `known_nodes`, the nodes this supervisor has
seen on the broker, so a sender can tell which nodes did not answer.

A command that takes longer than `ACK_AFTER_S` first gets an interim reply
with `"pending": true`, then the final one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import aiormq
import anyio
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdk import __version__, names, signing
from sdk.codec import JSON
from sdk.errors import MrqError, NoRoute, SignatureError
from sdk.wire import Command, NodeStatus, Reply, WireError, decode
from supervisor import operations
from supervisor.ctlclient import ControlClient
from supervisor.node import StartupError
from supervisor.operations import OperationError
from supervisor.registry import RegistryError

if TYPE_CHECKING:
    from supervisor.node import Node

__all__ = ["PEERS_META_KEY", "ControlServer", "PeerBook", "command_queue_name"]

PEERS_META_KEY: Final = "peers"
# A peer that sent no presence message for this long is forgotten.
PEER_SILENCE_S: Final = 24 * 3600.0
PEERS_SAVE_INTERVAL_S: Final = 60.0
ACK_AFTER_S: Final = 0.5
# The maximum run time of a command. The operations' own deadlines end them much sooner.
COMMAND_TIMEOUT_S: Final = 600.0
# How long stop() lets running commands finish (and send their replies) before cancelling them.
STOP_GRACE_S: Final = 2.0
DUPLICATE_CHECK_TIMEOUT_S: Final = 2.0
DISCOVERY_TIMEOUT_S: Final = 2.0
REJECTION_LOG_INTERVAL_S: Final = 5.0
_BACKLOG: Final = 256
_PREFETCH: Final = 64


def command_queue_name(control_exchange: str, node: str) -> str:
    """Return the name of a supervisor's exclusive command queue.

    The fixed name makes a second supervisor with the same node name fail to
    declare it (RESOURCE_LOCKED), even when it cannot verify the first one's replies.
    """
    return f"{control_exchange}.supervisor.{node}"


@dataclass
class Peer:
    """A supervisor seen through its presence messages."""

    node: str
    host: str
    pid: int
    version: str
    started_at: float
    last_seen: float
    dashboard_url: str | None = None


class PeerBook:
    """The nodes seen on the broker: added on "up", dropped on "down" or after `silence_s`."""

    def __init__(self, own_node: str, silence_s: float = PEER_SILENCE_S) -> None:
        self.own_node = own_node
        self.silence_s = silence_s
        self.peers: dict[str, Peer] = {}
        self.changed = False

    def load(self, raw: str | None, now: float) -> None:
        """Restore the peers stored by `dump`; a malformed value is ignored."""
        try:
            entries = orjson.loads(raw) if raw else []
            self.peers = {entry["node"]: Peer(**entry) for entry in entries}
        except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
            logger.warning("stored peers ignored meta_key={} error={}", PEERS_META_KEY, exc)
            self.peers = {}
        self.forget_silent(now)

    def dump(self) -> str:
        return orjson.dumps([asdict(peer) for peer in self.peers.values()]).decode()

    def observe(self, status: NodeStatus, now: float) -> None:
        """Record a presence message: "up" adds or refreshes the node, "down" drops it."""
        if status.node == self.own_node:
            return
        if status.state == "down":
            if self.peers.pop(status.node, None) is not None:
                logger.info("peer left node={} host={}", status.node, status.host)
                self.changed = True
            return
        if status.node not in self.peers:
            logger.info("peer seen node={} host={} pid={}", status.node, status.host, status.pid)
            self.changed = True
        self.peers[status.node] = Peer(
            node=status.node,
            host=status.host,
            pid=status.pid,
            version=status.version,
            started_at=status.started_at,
            last_seen=now,
            dashboard_url=status.dashboard_url,
        )

    def add_replied(self, result: Mapping[str, Any], now: float) -> None:
        """Record a node from its reply to `identify` (node, pid, host, version, started_at)."""
        try:
            status = NodeStatus(sent_at=now, **result)
        except (TypeError, ValidationError) as exc:
            logger.debug("identify reply ignored error={}", exc)
            return
        self.observe(status, now)

    def forget_silent(self, now: float) -> None:
        for name, peer in list(self.peers.items()):
            if now - peer.last_seen > self.silence_s:
                del self.peers[name]
                logger.info("peer forgotten node={} silent_s={:.0f}", name, now - peer.last_seen)
                self.changed = True

    def known(self) -> list[str]:
        return sorted({self.own_node, *self.peers})


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _NoArgs(_Args):
    pass


class _StatusArgs(_Args):
    services: list[str] | None = None
    missing_ok: bool = False


class _TargetArgs(_Args):
    targets: list[str] = []
    all: bool = False
    missing_ok: bool = False


class _ScaleArgs(_Args):
    service: str
    replicas: int
    missing_ok: bool = False


class _LogsArgs(_Args):
    target: str
    lines: int = 100
    offsets: dict[str, int] | None = None
    missing_ok: bool = False


class _EventsArgs(_Args):
    limit: int = 100
    service: str | None = None
    since_id: int | None = None


class _SendArgs(_Args):
    route: str
    body: Any = None


class _CallArgs(_SendArgs):
    timeout_s: float = Field(default=10.0, gt=0, le=3600)


class _PingArgs(_Args):
    service: str | None = None
    missing_ok: bool = False


Operation = Callable[["Node", Any], Awaitable[dict[str, Any]]]


def _absent(node: Node, service: str, missing_ok: bool) -> bool:
    """Return True when the reply is "not found here" instead of running the operation."""
    return missing_ok and service not in node.groups


class _IdentifyArgs(_Args):
    """The asking supervisor's own identity, so that discovery works both ways; absent from the CLI."""

    node: str | None = None
    pid: int | None = None
    host: str | None = None
    version: str | None = None
    started_at: float | None = None


def _identity(node: Node) -> dict[str, Any]:
    return {
        "node": node.node,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "version": __version__,
        "started_at": node.started_at,
    }


async def _identify(node: Node, _args: _IdentifyArgs) -> dict[str, Any]:
    return _identity(node)


async def _status(node: Node, a: _StatusArgs) -> dict[str, Any]:
    return await operations.status(node, a.services, missing_ok=a.missing_ok)


async def _start(node: Node, a: _TargetArgs) -> dict[str, Any]:
    return await operations.start(node, a.targets, a.all, missing_ok=a.missing_ok)


async def _stop(node: Node, a: _TargetArgs) -> dict[str, Any]:
    return await operations.stop(node, a.targets, a.all, missing_ok=a.missing_ok)


async def _restart(node: Node, a: _TargetArgs) -> dict[str, Any]:
    return await operations.restart(node, a.targets, a.all, missing_ok=a.missing_ok)


async def _scale(node: Node, a: _ScaleArgs) -> dict[str, Any]:
    if _absent(node, a.service, a.missing_ok):
        return {"found": False}
    return await operations.scale(node, a.service, a.replicas)


async def _logs(node: Node, a: _LogsArgs) -> dict[str, Any]:
    if _absent(node, operations.parse_target(a.target).service, a.missing_ok):
        return {"found": False}
    return await operations.logs(node, a.target, a.lines, a.offsets)


async def _events(node: Node, a: _EventsArgs) -> dict[str, Any]:
    return await operations.events(node, a.limit, a.service, a.since_id)


async def _send(node: Node, a: _SendArgs) -> dict[str, Any]:
    return await operations.send(node, a.route, a.body)


async def _call(node: Node, a: _CallArgs) -> dict[str, Any]:
    return await operations.call(node, a.route, a.body, a.timeout_s)


async def _ping(node: Node, a: _PingArgs) -> dict[str, Any]:
    if a.service is not None and _absent(node, a.service, a.missing_ok):
        return {"found": False}
    return await operations.ping(node, a.service)


async def _reload(node: Node, _args: _NoArgs) -> dict[str, Any]:
    return await operations.reload(node)


async def _shutdown(node: Node, _args: _NoArgs) -> dict[str, Any]:
    return await operations.shutdown(node)


_READ_COMMANDS: Final = frozenset({"status", "logs", "events", "ping", "identify"})

COMMANDS: Final[Mapping[str, tuple[type[_Args], Operation]]] = {
    "identify": (_IdentifyArgs, _identify),
    "status": (_StatusArgs, _status),
    "start": (_TargetArgs, _start),
    "stop": (_TargetArgs, _stop),
    "restart": (_TargetArgs, _restart),
    "scale": (_ScaleArgs, _scale),
    "logs": (_LogsArgs, _logs),
    "events": (_EventsArgs, _events),
    "send": (_SendArgs, _send),
    "call": (_CallArgs, _call),
    "ping": (_PingArgs, _ping),
    "reload": (_NoArgs, _reload),
    "shutdown": (_NoArgs, _shutdown),
}


class _RejectionLog:
    """Logs the first rejection of each kind at once, then at most one line per kind and interval."""

    def __init__(self, interval_s: float = REJECTION_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.total = 0
        self._unreported: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def add(self, reason: str, size: int) -> None:
        self.total += 1
        kind = reason.partition(":")[0]
        self._unreported[kind] = self._unreported.get(kind, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(kind)
        if last is not None and now - last < self.interval_s:
            return
        count = self._unreported.pop(kind)
        logger.warning("command rejected reason={} count={} size={}", reason, count, size)
        self._logged_at[kind] = now

    def flush(self) -> None:
        """Log the rejections counted since the last line of their kind."""
        for kind, count in self._unreported.items():
            logger.warning("command rejected reason={} count={}", kind, count)
        self._unreported.clear()


class ControlServer:
    """A node extension: consumes the node's command queue and follows the other nodes' presence."""

    def __init__(self, *, peer_silence_s: float = PEER_SILENCE_S) -> None:
        self.peer_silence_s = peer_silence_s
        self.peers: PeerBook | None = None
        self.rejections = _RejectionLog()
        self._node: Node | None = None
        self._verifier: signing.CommandVerifier | None = None
        self._channel: AbstractRobustChannel | None = None
        self._send_inbox: MemoryObjectSendStream[AbstractIncomingMessage] | None = None
        # Created in start(): anyio events need a running event loop.
        self._stopping: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._dropped = 0

    @property
    def node(self) -> Node:
        if self._node is None:
            raise RuntimeError("the control server is not started")
        return self._node

    async def start(self, node: Node) -> None:
        """Refuse a duplicate node name, restore the peers, then consume commands and presence."""
        if node.broker is None or node.task_group is None:
            raise RuntimeError("the control server needs a connected node with a task group")
        self.attach(node)
        self._stopping, self._stopped = anyio.Event(), anyio.Event()
        assert self.peers is not None
        self.peers.load(await node.registry.get_meta(PEERS_META_KEY), time.time())
        await self._refuse_duplicate()
        self._channel = await node.broker.channel(prefetch=_PREFETCH)
        await self._consume_commands(self._channel)
        await self._consume_presence(self._channel)
        self._send_inbox, inbox = anyio.create_memory_object_stream[AbstractIncomingMessage](_BACKLOG)
        node.task_group.create_task(self._run(inbox), name="control server")
        logger.info("control server started node={} queue={}", node.node, self._queue_name())

    def attach(self, node: Node) -> None:
        """Bind the server to a node, so that `handle` can verify and run commands.

        `start` calls it; tests call it alone to feed commands to `handle` without a broker.
        """
        self._node = node
        # The nonces seen by an earlier run of this node are gone, so a command issued before
        # this start could be a replay.
        self._verifier = signing.CommandVerifier(
            node.key,
            max_age_s=node.settings.command_max_age_s,
            targets={names.supervisor_command_key(node.node), names.supervisor_command_key(None)},
            not_before=node.started_at,
        )
        self.peers = PeerBook(node.node, self.peer_silence_s)

    async def stop(self) -> None:
        """Stop taking commands, let running ones finish for `STOP_GRACE_S`, then cancel them."""
        if self._stopping is None or self._stopped is None:
            return
        self._stopping.set()
        with anyio.move_on_after(STOP_GRACE_S + 5.0):
            await self._stopped.wait()
        if self._send_inbox is not None:
            self._send_inbox.close()
        self.rejections.flush()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with anyio.move_on_after(5.0):
                await channel.close()
        await self._save_peers()

    def _queue_name(self) -> str:
        settings = self.node.settings
        return command_queue_name(settings.control_exchange, settings.node)

    async def _refuse_duplicate(self) -> None:
        node = self.node
        assert node.broker is not None
        client = ControlClient(node.broker, node.key, sender=f"supervisor {node.node} pid {os.getpid()}")
        await client.start()
        try:
            gathered = await client.gather(
                "identify", {}, node=node.node, timeout_s=DUPLICATE_CHECK_TIMEOUT_S, wait_s=0.0
            )
        except NoRoute:
            return
        finally:
            await client.close()
        for reply in gathered.replies.values():
            result = reply.result if isinstance(reply.result, dict) else {}
            raise StartupError(
                f"another supervisor already runs as node {node.node!r} on this broker "
                f"(pid {result.get('pid')} on host {result.get('host')!r} answered); "
                "give this one another name with `node` in [supervisor] or MRQ_NODE, or stop the other one"
            )

    async def _consume_commands(self, channel: AbstractRobustChannel) -> None:
        node = self.node
        settings = node.settings
        try:
            queue = await node.broker.declare_queue(  # type: ignore[union-attr]
                channel,
                self._queue_name(),
                durable=False,
                exclusive=True,
                auto_delete=True,
                arguments={"x-message-ttl": max(int(settings.command_max_age_s * 1000), 1)},
            )
        except aiormq.exceptions.ChannelLockedResource:
            raise StartupError(
                f"another supervisor already consumes the command queue of node {node.node!r} on this "
                "broker; give this one another name with `node` in [supervisor] or MRQ_NODE"
            ) from None
        for target in (node.node, None):
            await queue.bind(settings.control_exchange, names.supervisor_command_key(target))
        await queue.consume(self._on_command, no_ack=True)

    async def _consume_presence(self, channel: AbstractRobustChannel) -> None:
        node = self.node
        queue = await node.broker.declare_queue(  # type: ignore[union-attr]
            channel, "", durable=False, exclusive=True, auto_delete=True
        )
        await queue.bind(node.settings.control_exchange, names.supervisor_presence_key("*"))
        await queue.consume(self._on_presence, no_ack=True)

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        if self._send_inbox is None:
            return
        try:
            self._send_inbox.send_nowait(message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # stopping: the server takes no more commands
        except anyio.WouldBlock:
            self._dropped += 1
            if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                logger.warning(
                    "command dropped, too many waiting backlog={} count={}", _BACKLOG, self._dropped
                )

    async def _on_presence(self, message: AbstractIncomingMessage) -> None:
        try:
            signing.check_signature(self.node.key, message.body, message.headers)
            status = decode(message.body)
        except SignatureError as exc:
            self.rejections.add(f"presence {exc}", len(message.body))
            return
        except WireError as exc:
            logger.debug("invalid presence message ignored error={}", exc)
            return
        if isinstance(status, NodeStatus) and self.peers is not None:
            new = (
                status.state == "up" and status.node not in self.peers.peers and status.node != self.node.node
            )
            self.peers.observe(status, time.time())
            if new:
                # A node that just appeared may have missed this one's last presence message.
                await self.node.publish_presence("up")

    async def _run(self, inbox: MemoryObjectReceiveStream[AbstractIncomingMessage]) -> None:
        stopping, stopped = self._stopping, self._stopped
        assert stopping is not None
        assert stopped is not None
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._save_peers_loop)
                background.start_soon(self._discover_peers)
                async with anyio.create_task_group() as handlers:
                    receiving = anyio.CancelScope()
                    handlers.start_soon(self._receive, inbox, handlers, receiving)
                    await stopping.wait()
                    receiving.cancel()
                    # Commands already running get STOP_GRACE_S to finish and reply.
                    handlers.cancel_scope.deadline = anyio.current_time() + STOP_GRACE_S
                background.cancel_scope.cancel()
        finally:
            stopped.set()

    async def _receive(
        self,
        inbox: MemoryObjectReceiveStream[AbstractIncomingMessage],
        handlers: TaskGroup,
        receiving: anyio.CancelScope,
    ) -> None:
        with receiving:
            async with inbox:
                async for message in inbox:
                    handlers.start_soon(self._serve, message)

    async def _serve(self, message: AbstractIncomingMessage) -> None:
        """Verify and run one command, then send its reply; its errors do not stop the server."""
        try:
            command = self.verify(message.body, message.headers)
            if command is None:
                return
            reply = await self._execute_with_ack(command, message)
            await self._send_reply(message, reply)
        except Exception as exc:
            logger.opt(exception=exc).error("command handling failed size={}", len(message.body))

    def verify(self, body: bytes, headers: Mapping[str, Any] | None) -> Command | None:
        """Return the verified command, or None after logging why it was rejected."""
        if self._verifier is None:
            raise RuntimeError("the control server is not started")
        try:
            return self._verifier.verify(body, headers)
        except SignatureError as exc:
            self.rejections.add(str(exc), len(body))
        return None

    async def handle(self, body: bytes, headers: Mapping[str, Any] | None) -> Reply | None:
        """Verify and execute one command; return its reply, or None when it was rejected."""
        command = self.verify(body, headers)
        return None if command is None else await self.execute(command)

    async def _execute_with_ack(self, command: Command, message: AbstractIncomingMessage) -> Reply:
        async with anyio.create_task_group() as task_group:
            done = anyio.Event()

            async def acknowledge_later() -> None:
                await anyio.sleep(ACK_AFTER_S)
                if not done.is_set():
                    await self._send_reply(message, self._reply(command, True, {"pending": True}, None))

            task_group.start_soon(acknowledge_later)
            reply = await self.execute(command)
            done.set()
            task_group.cancel_scope.cancel()
        return reply

    async def execute(self, command: Command) -> Reply:
        """Run a verified command and return the reply; an error becomes a reply with `ok` false."""
        # Reads come every few seconds from an open dashboard: only changes are worth INFO.
        level = "DEBUG" if command.name in _READ_COMMANDS else "INFO"
        logger.log(
            level, "command received name={} sender={} id={}", command.name, command.sender, command.id
        )
        entry = COMMANDS.get(command.name)
        if entry is None:
            known = ", ".join(sorted(COMMANDS))
            return self._reply(command, False, None, f"unknown command {command.name!r}; known: {known}")
        args_model, operation = entry
        try:
            args = args_model.model_validate(command.args)
            if isinstance(args, _IdentifyArgs):
                self._record_asking_peer(args)
            with anyio.fail_after(COMMAND_TIMEOUT_S):
                result = await operation(self.node, args)
        except ValidationError as exc:
            return self._reply(command, False, None, _arguments_error(command.name, exc))
        except (OperationError, RegistryError, MrqError) as exc:
            logger.info("command failed name={} id={} error={}", command.name, command.id, exc)
            return self._reply(command, False, None, str(exc))
        except TimeoutError:
            error = f"command {command.name!r} did not finish within {COMMAND_TIMEOUT_S:g} s"
            logger.error("command timed out name={} id={}", command.name, command.id)
            return self._reply(command, False, None, error)
        except Exception as exc:
            logger.opt(exception=exc).error("command failed name={} id={}", command.name, command.id)
            return self._reply(command, False, None, f"{type(exc).__name__}: {exc}")
        return self._reply(command, True, result, None)

    def _record_asking_peer(self, args: _IdentifyArgs) -> None:
        if args.node is not None and args.node != self.node.node and self.peers is not None:
            self.peers.add_replied(args.model_dump(), time.time())

    def _reply(self, command: Command, ok: bool, result: dict[str, Any] | None, error: str | None) -> Reply:
        known = self.peers.known() if self.peers is not None else [self.node.node]
        return Reply(
            command_id=command.id,
            node=self.node.node,
            ok=ok,
            result={**(result or {}), "known_nodes": known},
            error=error,
        )

    async def _send_reply(self, message: AbstractIncomingMessage, reply: Reply) -> None:
        broker = self.node.broker
        if not message.reply_to or broker is None:
            return
        body = reply.to_json()
        properties = broker.properties(
            content_type=JSON,
            headers=signing.sign_headers(self.node.key, body),
            correlation_id=message.correlation_id,
            persistent=False,
        )
        if not await broker.publish_nowait("", message.reply_to, body, properties):
            logger.warning("reply not sent, broker disconnected command_id={}", reply.command_id)

    async def _discover_peers(self) -> None:
        """Ask every running supervisor who it is, once at start.

        Presence messages alone are not enough: two supervisors that start together
        each announce themselves before the other listens, and would otherwise learn
        of each other only at the next announcement.
        """
        node = self.node
        assert node.broker is not None
        client = ControlClient(node.broker, node.key, sender=f"supervisor {node.node} pid {os.getpid()}")
        try:
            await client.start()
            limit_s = DISCOVERY_TIMEOUT_S
            gathered = await client.gather(
                "identify", _identity(node), timeout_s=limit_s, wait_s=0.0, min_wait_s=limit_s
            )
        except (NoRoute, MrqError, aiormq.exceptions.AMQPError, TimeoutError) as exc:
            logger.warning("peer discovery failed error={}", exc)
            return
        finally:
            with anyio.move_on_after(5.0):
                await client.close()
        now = time.time()
        for reply in gathered.replies.values():
            if reply.ok and isinstance(reply.result, dict) and self.peers is not None:
                self.peers.add_replied(reply.result, now)

    async def _save_peers_loop(self) -> None:
        """Store the peers soon after a change, and at least every `PEERS_SAVE_INTERVAL_S`."""
        saved_at = time.monotonic()
        while True:
            await anyio.sleep(1.0)
            if self.peers is None:
                continue
            self.peers.forget_silent(time.time())
            if self.peers.changed or time.monotonic() - saved_at >= PEERS_SAVE_INTERVAL_S:
                await self._save_peers()
                saved_at = time.monotonic()

    async def _save_peers(self) -> None:
        if self.peers is None or self._node is None:
            return
        self.peers.changed = False
        try:
            await self._node.registry.set_meta(PEERS_META_KEY, self.peers.dump())
        except RegistryError as exc:
            logger.warning("peers not stored error={}", exc)


def _arguments_error(name: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(args)'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )
    return f"invalid arguments for command {name!r}: {problems}"
