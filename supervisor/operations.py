"""What an operator can ask of one node: status, start, stop, restart, scale, logs, events, calls.

The control server and the dashboard of the same process call these functions.
Each returns a JSON-able dict and raises `OperationError` on input that names
nothing on this node or requests something impossible. Targets are `SERVICE`
(every instance of the service) or `SERVICE:INSTANCE`.

`missing_ok=True` turns "service not found" into an empty result: a command
sent to every node reaches nodes that do not run the service, and only the
caller, which sees all replies, can tell whether any node had it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio

from sdk import names
from sdk.errors import MrqError, NoRoute, RemoteError, RpcTimeout
from supervisor import logfiles
from supervisor.group import RollingRestart
from supervisor.instance import Instance
from supervisor.policy import State

if TYPE_CHECKING:
    from supervisor.node import Node

__all__ = [
    "MAX_LOG_LINES",
    "MAX_REPLICAS",
    "OperationError",
    "call",
    "events",
    "logs",
    "parse_target",
    "ping",
    "reload",
    "restart",
    "scale",
    "send",
    "shutdown",
    "start",
    "status",
    "stop",
]

MAX_REPLICAS: Final = 256
MAX_LOG_LINES: Final = 10_000
MAX_EVENTS: Final = 10_000
# A log read with an offset returns at most this many bytes, so one reply stays small.
MAX_LOG_CHUNK_BYTES: Final = 256 * 1024
PING_TIMEOUT_S: Final = 5.0
# Added to the settings' own timeouts, so that an operation ends after the instance would have.
_WAIT_MARGIN_S: Final = 5.0
_UP_SETTLED: Final = frozenset({State.RUNNING, State.FATAL, State.EXITED})
_DOWN_SETTLED: Final = frozenset({State.STOPPED, State.EXITED, State.FATAL})


class OperationError(MrqError):
    """A request names no service or instance of this node, or requests something impossible."""


@dataclass(frozen=True)
class Target:
    """A parsed `SERVICE` or `SERVICE:INSTANCE`; `index` None means every instance."""

    service: str
    index: int | None


def parse_target(text: str) -> Target:
    """Parse `SERVICE` or `SERVICE:INSTANCE`; raise OperationError for any other form."""
    service, separator, index_text = text.partition(":")
    if not names.SERVICE_NAME_RE.match(service):
        raise OperationError(
            f"invalid target {text!r}: expected SERVICE or SERVICE:INSTANCE with a service name "
            "of a-z, 0-9, '_' and '-'; check the spelling"
        )
    if not separator:
        return Target(service, None)
    if not index_text.isdigit():
        raise OperationError(
            f"invalid instance {index_text!r} in target {text!r}: expected a number such as {service}:0"
        )
    return Target(service, int(index_text))


def _resolve(node: Node, targets: list[str], all_: bool, missing_ok: bool) -> list[Instance]:
    """Return the instances that the targets name, in order and without duplicates."""
    if all_:
        return node.instances()
    if not targets:
        raise OperationError("no target given: name SERVICE or SERVICE:INSTANCE, or ask for all")
    chosen: dict[int, Instance] = {}
    for text in targets:
        for instance in _instances_of(node, parse_target(text), missing_ok):
            chosen.setdefault(id(instance), instance)
    return list(chosen.values())


def _instances_of(node: Node, target: Target, missing_ok: bool) -> list[Instance]:
    group = node.groups.get(target.service)
    if group is None:
        if missing_ok:
            return []
        known = ", ".join(sorted(node.groups)) or "none"
        raise OperationError(
            f"service {target.service!r} not found on node {node.node}; its services: {known}"
        )
    if target.index is None:
        return list(group.instances)
    if target.index >= group.replicas:
        raise OperationError(
            f"instance {target.service}:{target.index} not found on node {node.node}: the service "
            f"has {group.replicas} instance(s), numbered from 0; scale it up first"
        )
    return [group.instances[target.index]]


def _summary(instances: Iterable[Instance]) -> list[dict[str, Any]]:
    return [
        {"service": i.service, "instance": i.index, "state": str(i.state), "pid": i.pid} for i in instances
    ]


async def _wait_until(
    node: Node, instances: list[Instance], settled: frozenset[State], wait_s: float
) -> None:
    with anyio.move_on_after(wait_s):
        await node.wait_for(lambda: all(i.state in settled for i in instances))


def _pending(instances: list[Instance], settled: frozenset[State]) -> list[str]:
    return [i.name for i in instances if i.state not in settled]


async def status(
    node: Node, services: list[str] | None = None, *, missing_ok: bool = False
) -> dict[str, Any]:
    """Return the node's figures and a snapshot of its instances (of the named services only)."""
    result = node.status()
    if not services:
        return result
    unknown = [name for name in services if name not in node.groups]
    if unknown and not missing_ok:
        known = ", ".join(sorted(node.groups)) or "none"
        raise OperationError(
            f"service {', '.join(map(repr, unknown))} not found on node {node.node}; its services: {known}"
        )
    wanted = set(services)
    result["instances"] = [row for row in result["instances"] if row["service"] in wanted]
    result["services"] = {k: v for k, v in result["services"].items() if k in wanted}
    return result


async def start(
    node: Node, targets: list[str], all_: bool = False, *, missing_ok: bool = False
) -> dict[str, Any]:
    """Start the instances (clearing `fatal`) and wait until each runs or gives up."""
    instances = _resolve(node, targets, all_, missing_ok)
    for instance in instances:
        instance.request_start()
    await _wait_until(node, instances, _UP_SETTLED, node.settings.start_timeout_s + _WAIT_MARGIN_S)
    return {"instances": _summary(instances), "pending": _pending(instances, _UP_SETTLED)}


async def stop(
    node: Node, targets: list[str], all_: bool = False, *, missing_ok: bool = False
) -> dict[str, Any]:
    """Stop the instances and wait until their processes are gone."""
    instances = _resolve(node, targets, all_, missing_ok)
    for instance in instances:
        instance.request_stop()
    stop_timeout_s = max((i.config.stop_timeout_s for i in instances), default=0.0)
    await _wait_until(node, instances, _DOWN_SETTLED, stop_timeout_s + _WAIT_MARGIN_S)
    return {"instances": _summary(instances), "pending": _pending(instances, _DOWN_SETTLED)}


async def restart(
    node: Node, targets: list[str], all_: bool = False, *, missing_ok: bool = False
) -> dict[str, Any]:
    """Restart the instances; those of one service one at a time, so the service keeps consumers.

    Services restart in parallel. A service's restart stops at the first instance that
    goes fatal or exits, or that is not running within its stop_timeout_s plus
    start_timeout_s. `failed` then describes it, and the instances after it keep running.
    """
    instances = _resolve(node, targets, all_, missing_ok)
    by_service: dict[str, list[int]] = {}
    for instance in instances:
        by_service.setdefault(instance.service, []).append(instance.index)
    outcomes: list[RollingRestart] = []

    async def restart_service(service: str, indexes: list[int]) -> None:
        outcomes.append(await node.groups[service].restart_rolling(indexes))

    async with anyio.create_task_group() as task_group:
        for service, indexes in by_service.items():
            task_group.start_soon(restart_service, service, indexes)
    return {
        "instances": _summary(instances),
        "pending": _pending(instances, _UP_SETTLED),
        "failed": [
            outcome.to_dict() | {"error": outcome.describe()} for outcome in outcomes if not outcome.ok
        ],
    }


async def scale(node: Node, service: str, replicas: int) -> dict[str, Any]:
    """Run `replicas` instances of the service: start new ones, or stop the highest-numbered.

    NOTE: the new count lasts until the supervisor restarts or supervisor.toml is
    reloaded with another `replicas`; the file is not changed.
    """
    group = node.groups.get(service)
    if group is None:
        known = ", ".join(sorted(node.groups)) or "none"
        raise OperationError(f"service {service!r} not found on node {node.node}; its services: {known}")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise OperationError(
            f"invalid replica count {replicas} for {service!r}: expected 0 to {MAX_REPLICAS}"
        )
    if node.task_group is None:
        raise OperationError(f"node {node.node} is still starting; try again in a moment")
    before = await group.scale(replicas, node.task_group)
    return {"service": service, "replicas_before": before, "replicas": replicas}


async def logs(
    node: Node, target: str, lines: int = 100, offsets: dict[str, int] | None = None
) -> dict[str, Any]:
    """Return the last `lines` lines of each target instance's log file, with the file's end offset.

    With `offsets` (instance name to a byte offset returned earlier) it returns the
    complete lines written since that offset instead, for following a log remotely.
    """
    if not 0 <= lines <= MAX_LOG_LINES:
        raise OperationError(f"invalid line count {lines}: expected 0 to {MAX_LOG_LINES}")
    instances = _instances_of(node, parse_target(target), missing_ok=False)
    result = []
    for instance in instances:
        path = logfiles.instance_log_path(node.state_dir, instance.service, instance.index)
        offset = (offsets or {}).get(instance.name)
        if offset is None:
            text_lines = await logfiles.tail(path, lines)
            end = await anyio.to_thread.run_sync(_file_size, path)
        else:
            text_lines, end = await anyio.to_thread.run_sync(_read_from, path, offset)
        result.append({"instance": instance.name, "path": str(path), "lines": text_lines, "offset": end})
    return {"node": node.node, "logs": result}


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> tuple[list[str], int]:
    """Read the complete lines after `offset`; start over at 0 when the file is now shorter."""
    size = _file_size(path)
    if offset > size:
        offset = 0
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read(MAX_LOG_CHUNK_BYTES)
    except FileNotFoundError:
        return [], 0
    complete = data.rfind(b"\n") + 1
    if complete == 0 and len(data) == MAX_LOG_CHUNK_BYTES:
        complete = len(data)  # one line longer than a chunk: hand it over in pieces
    text = data[:complete].decode("utf-8", errors="replace")
    return text.splitlines(), offset + complete


async def events(
    node: Node, limit: int = 100, service: str | None = None, since_id: int | None = None
) -> dict[str, Any]:
    """Return up to `limit` events from the node's registry, oldest first."""
    if not 0 <= limit <= MAX_EVENTS:
        raise OperationError(f"invalid event limit {limit}: expected 0 to {MAX_EVENTS}")
    records = await node.registry.events(limit=limit, service=service, since_id=since_id)
    return {
        "node": node.node,
        "events": [
            {
                "id": r.id,
                "time": r.time,
                "node": r.node,
                "kind": r.kind,
                "service": r.service,
                "instance": r.instance,
                "data": r.data,
            }
            for r in records
        ],
    }


def _messenger(node: Node) -> Any:
    if node.messenger is None:
        raise OperationError(f"node {node.node} is not connected to the broker yet; try again in a moment")
    return node.messenger


async def send(node: Node, route: str, body: Any) -> dict[str, Any]:
    """Send `body` to a route (`service.route`, or `service` for its default route) without waiting."""
    _check_route(route)
    try:
        await _messenger(node).send(route, body)
    except NoRoute as exc:
        raise OperationError(str(exc)) from exc
    return {"route": route, "sent": True}


async def call(node: Node, route: str, body: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """Call a route and return its reply, or the error, with the round-trip time in ms."""
    _check_route(route)
    if not 0 < timeout_s <= 3600:
        raise OperationError(f"invalid timeout {timeout_s} s: expected more than 0 and at most 3600")
    began = time.perf_counter()
    try:
        reply = await _messenger(node).call(route, body, timeout=timeout_s)
    except (NoRoute, RemoteError, RpcTimeout, MrqError) as exc:
        return {"route": route, "ok": False, "error": _error_dict(exc), "rtt_ms": _elapsed_ms(began)}
    return {"route": route, "ok": True, "reply": reply, "rtt_ms": _elapsed_ms(began)}


def _check_route(route: str) -> None:
    if not names.ROUTE_NAME_RE.match(route):
        raise OperationError(
            f"invalid route {route!r}: expected SERVICE or SERVICE.ROUTE, for example billing.quote"
        )


def _error_dict(exc: Exception) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RemoteError):
        error.update(remote_type=exc.type, remote_message=exc.message, errors=exc.errors)
    return error


def _elapsed_ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 2)


async def ping(node: Node, service: str | None = None) -> dict[str, Any]:
    """Call the built-in `_ping` route of each Python service of the node (or of the one named)."""
    if service is not None:
        group = node.groups.get(service)
        if group is None:
            known = ", ".join(sorted(node.groups)) or "none"
            raise OperationError(f"service {service!r} not found on node {node.node}; its services: {known}")
        if group.config.kind != "python":
            raise OperationError(
                f"service {service!r} is a program, not a Python service, so it has no ping route"
            )
    groups = [g for name, g in node.groups.items() if service in (None, name) and g.config.kind == "python"]
    results = []
    for group in groups:
        for sdk_service in _sdk_services(group.instances) or [group.name]:
            outcome = await call(node, f"{sdk_service}.{names.PING_ROUTE}", None, PING_TIMEOUT_S)
            outcome.pop("route")
            results.append({"service": group.name, "sdk_service": sdk_service, **outcome})
    return {"node": node.node, "pings": results}


def _sdk_services(instances: list[Instance]) -> list[str]:
    """Return the SDK services that the instances announced; one module can define several."""
    for instance in instances:
        if instance.hello is not None:
            return sorted({route.service for route in instance.hello.routes})
    return []


async def reload(node: Node) -> dict[str, Any]:
    """Apply a changed supervisor.toml.

    Raises OperationError when the file is invalid, and when a rolling restart of a
    changed service stopped at an instance that did not run again.
    """
    result = await node.reload()
    if result.get("failed"):
        raise OperationError(f"reload on node {node.node} applied the file, but {result.get('error')}")
    if result.get("partial"):
        raise OperationError(
            f"reload on node {node.node} stopped after applying part of the file: {result.get('error')}; "
            "see the supervisor log, then reload again"
        )
    if not result.get("ok"):
        raise OperationError(
            f"reload failed on node {node.node}, the configuration was kept: {result.get('error')}"
        )
    return {"node": node.node, **result}


async def shutdown(node: Node) -> dict[str, Any]:
    """Ask the node to stop all its instances and exit; return at once."""
    node.request_shutdown()
    return {"node": node.node, "stopping": True}
