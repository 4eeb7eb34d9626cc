"""The dashboard's HTTP API: status, live streams, actions, the route console, logs and events.

Every handler returns JSON, and an error is `{"ok": false, "error": "<message>"}` with a
4xx or 5xx status. Reads and streams are GET; actions and console messages are POST
with a JSON body (the token check in `auth` requires a header for them).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import anyio
import orjson
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from sdk.errors import NoRoute
from supervisor import logfiles, operations
from supervisor.dashboard.cluster import Cluster, ClusterError, EventFanout
from supervisor.dashboard.sse import SseResponse, SseWriter
from supervisor.operations import OperationError

if TYPE_CHECKING:
    from supervisor.node import Node

__all__ = ["Api", "LocalStatus"]

# Heartbeats are pulled from the broker at most this often for fresh heartbeat ages.
PULL_INTERVAL_S: Final = 1.0
PULL_TIMEOUT_S: Final = 2.0
STATUS_FRAME_INTERVAL_S: Final = 1.0
# After an event, the next status frame waits this long, so a burst of events sends one frame.
EVENT_SETTLE_S: Final = 0.05
ACTION_TIMEOUT_S: Final = 600.0
LOG_LINES_DEFAULT: Final = 200
LOG_LINES_MAX: Final = 5000
REMOTE_LOG_POLL_S: Final = 1.0
EVENTS_DEFAULT: Final = 200


class LocalStatus:
    """This node's status, with heartbeats pulled from the broker at most once per PULL_INTERVAL_S."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._pulled_at = -math.inf
        self._lock = anyio.Lock()

    async def read(self) -> dict[str, Any]:
        listener = self.node.listener
        if listener is not None and time.monotonic() - self._pulled_at >= PULL_INTERVAL_S:
            async with self._lock:
                if time.monotonic() - self._pulled_at >= PULL_INTERVAL_S:
                    with anyio.move_on_after(PULL_TIMEOUT_S):
                        await listener.pull()
                    self._pulled_at = time.monotonic()
        return await operations.status(self.node)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


_Model = TypeVar("_Model", bound=_Body)


class ActionRequest(_Body):
    action: Literal["start", "stop", "restart", "scale"]
    node: str | None = None
    targets: list[str] = []
    all: bool = False
    service: str | None = None
    replicas: int | None = None


class SendRequest(_Body):
    route: str
    body: Any = None


class CallRequest(SendRequest):
    timeout_s: float = Field(default=10.0, gt=0, le=300)


def _json(data: Any, status_code: int = 200) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return Response(body, status_code=status_code, media_type="application/json")


def _error(message: str, status_code: int) -> Response:
    return _json({"ok": False, "error": message}, status_code)


async def _parse(request: Request, model: type[_Model]) -> _Model:
    """Parse the request's JSON body into `model`; raise OperationError with every problem."""
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise OperationError(f"invalid JSON body: {exc}; send a JSON object") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise OperationError(f"invalid request: {problems}") from None


class Api:
    """The handlers of the dashboard's routes, bound to one node."""

    def __init__(self, node: Node, cluster: Cluster, fanout: EventFanout, closing: anyio.Event) -> None:
        self.node = node
        self.cluster = cluster
        self.fanout = fanout
        self.closing = closing
        self.local = LocalStatus(node)

    async def overview(self) -> dict[str, Any]:
        """Return every node's status: this node's fresh, the others' from the last poll."""
        cluster = self.cluster
        await cluster.refresh_if_stale()
        remote = [cluster.remote[name] for name in sorted(cluster.remote)]
        return {
            "local": self.node.node,
            "at": time.time(),
            "nodes": [await self.local.read(), *remote],
            "missing": cluster.missing,
            "errors": cluster.errors,
            "remote_polled_at": cluster.polled_at,
        }

    async def status(self, request: Request) -> Response:
        return _json(await self.overview())

    async def stream(self, request: Request) -> Response:
        """Stream a `status` frame every second, and each event as an `event` frame at once."""

        async def produce(out: SseWriter) -> None:
            queue = self.fanout.subscribe()
            try:
                await out.event("status", await self.overview())
                due = time.monotonic() + STATUS_FRAME_INTERVAL_S
                while True:
                    event = None
                    with anyio.move_on_after(max(0.0, due - time.monotonic())):
                        event = await queue.get()
                    if event is not None:
                        await out.event("event", event)
                        due = min(due, time.monotonic() + EVENT_SETTLE_S)
                        continue
                    await out.event("status", await self.overview())
                    due = time.monotonic() + STATUS_FRAME_INTERVAL_S
            finally:
                self.fanout.unsubscribe(queue)

        return SseResponse(produce, self.closing)

    async def action(self, request: Request) -> Response:
        """Start, stop, restart or scale, on this node or through the control plane on another."""
        try:
            req = await _parse(request, ActionRequest)
            where = req.node or self.node.node
            logger.info(
                "dashboard action action={} node={} targets={} all={} service={} replicas={}",
                req.action,
                where,
                req.targets,
                req.all,
                req.service,
                req.replicas,
            )
            with anyio.fail_after(ACTION_TIMEOUT_S):
                if where == self.node.node:
                    result = await self._local_action(req)
                else:
                    result = await self.cluster.command(where, req.action, _command_args(req))
        except (OperationError, ClusterError, TimeoutError) as exc:
            return self._failed("action", exc)
        return _json({"ok": True, "node": where, "action": req.action, "result": result})

    async def _local_action(self, req: ActionRequest) -> dict[str, Any]:
        node = self.node
        if req.action == "scale":
            service, replicas = _scale_args(req)
            return await operations.scale(node, service, replicas)
        operation = {"start": operations.start, "stop": operations.stop, "restart": operations.restart}
        return await operation[req.action](node, req.targets, req.all)

    def _failed(self, what: str, exc: Exception) -> Response:
        if isinstance(exc, TimeoutError):
            message, status_code = f"{what} did not finish within {ACTION_TIMEOUT_S:g} s", 504
        else:
            message, status_code = str(exc), getattr(exc, "status_code", 400)
        logger.info("dashboard {} failed node={} error={}", what, self.node.node, message)
        return _error(message, status_code)

    async def send(self, request: Request) -> Response:
        """Publish a message to a route without waiting for a reply."""
        began = time.perf_counter()
        try:
            req = await _parse(request, SendRequest)
            result = await operations.send(self.node, req.route, req.body)
        except OperationError as exc:
            if not isinstance(exc.__cause__, NoRoute):
                return self._failed("send", exc)
            error = {"type": "NoRoute", "message": str(exc)}
            return _json({"route": req.route, "ok": False, "error": error, "rtt_ms": _ms(began)})
        return _json({**result, "ok": True, "rtt_ms": _ms(began)})

    async def call(self, request: Request) -> Response:
        """Call a route and return the reply or the error, with the round-trip time."""
        try:
            req = await _parse(request, CallRequest)
            with anyio.fail_after(req.timeout_s + 5.0):
                result = await operations.call(self.node, req.route, req.body, req.timeout_s)
        except (OperationError, TimeoutError) as exc:
            return self._failed("call", exc)
        return _json(result)

    async def events(self, request: Request) -> Response:
        """Return the latest events of every node, oldest first, optionally of one service."""
        try:
            limit = _int_param(request, "limit", EVENTS_DEFAULT, operations.MAX_EVENTS)
            service = request.query_params.get("service") or None
            local = await operations.events(self.node, limit, service)
        except OperationError as exc:
            return self._failed("events", exc)
        rows = list(local["events"])
        if self.cluster.remote or self.cluster.missing:
            args = {"limit": limit, "service": service}
            for result in (await self.cluster.gather_all("events", args)).values():
                rows.extend(result.get("events", []))
        rows.sort(key=lambda row: row["time"])
        return _json({"events": rows[-limit:] if limit else []})

    async def logs(self, request: Request) -> Response:
        """Stream one instance's log: the last lines first (`lines` frame, `reset`), then new ones."""
        try:
            target = request.query_params.get("target", "")
            parsed = operations.parse_target(target)
            if parsed.index is None:
                raise OperationError(f"invalid target {target!r}: expected SERVICE:INSTANCE, one instance")
            lines = _int_param(request, "lines", LOG_LINES_DEFAULT, LOG_LINES_MAX)
            where = request.query_params.get("node") or self.node.node
            if where == self.node.node:
                first = await operations.logs(self.node, target, lines)
            else:
                first = await self.cluster.command(where, "logs", {"target": target, "lines": lines})
        except (OperationError, ClusterError) as exc:
            return self._failed("logs", exc)
        entry = first["logs"][0]
        if where == self.node.node:
            return SseResponse(self._follow_local(entry), self.closing)
        return SseResponse(self._follow_remote(where, target, entry), self.closing)

    def _follow_local(self, entry: dict[str, Any]) -> Any:
        async def produce(out: SseWriter) -> None:
            await out.event("lines", {"instance": entry["instance"], "lines": entry["lines"], "reset": True})
            # NOTE: lines written between the tail above and the start of follow() are not shown.
            async with contextlib.aclosing(logfiles.follow(Path(entry["path"]))) as lines:
                async for line in lines:
                    await out.event("lines", {"instance": entry["instance"], "lines": [line]})

        return produce

    def _follow_remote(self, where: str, target: str, entry: dict[str, Any]) -> Any:
        async def produce(out: SseWriter) -> None:
            await out.event("lines", {"instance": entry["instance"], "lines": entry["lines"], "reset": True})
            offsets = {entry["instance"]: entry["offset"]}
            while True:
                await anyio.sleep(REMOTE_LOG_POLL_S)
                try:
                    args = {"target": target, "lines": 0, "offsets": offsets}
                    result = await self.cluster.command(where, "logs", args)
                except ClusterError as exc:
                    await out.event("error", {"error": str(exc)})
                    continue
                latest = result["logs"][0]
                offsets = {latest["instance"]: latest["offset"]}
                if latest["lines"]:
                    await out.event("lines", {"instance": latest["instance"], "lines": latest["lines"]})

        return produce


def _command_args(req: ActionRequest) -> dict[str, Any]:
    """Return the control-plane arguments of an action."""
    if req.action == "scale":
        service, replicas = _scale_args(req)
        return {"service": service, "replicas": replicas}
    return {"targets": req.targets, "all": req.all}


def _scale_args(req: ActionRequest) -> tuple[str, int]:
    if req.service is None or req.replicas is None:
        raise OperationError("invalid scale request: expected both `service` and `replicas`")
    return req.service, req.replicas


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > maximum:
        raise OperationError(f"invalid {name} {text!r}: expected a whole number from 0 to {maximum}")
    return int(text)


def _ms(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 2)
