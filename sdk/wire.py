"""Versioned JSON formats of the control plane.

Workers publish `Hello`, `Heartbeat` and `Goodbye`; supervisors publish
`NodeStatus` and `Event`; the CLI and dashboard send signed `Command`s and
receive `Reply`s. Every message carries `v` (the protocol version) and
`type`. Readers ignore fields they do not know, so a later minor change can
add fields; a message with another `v` is rejected.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION: Literal[1] = 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION

    def to_json(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self)


class RouteInfo(_Wire):
    """A queue that a service consumes, as its worker announces it."""

    service: str
    route: str
    queue: str
    kind: Literal["route", "event"] = "route"


class Hello(_Wire):
    """A worker is up: sent once at start and again when asked for it."""

    type: Literal["hello"] = "hello"
    node: str
    service: str
    instance: int
    pid: int
    started_at: float = Field(description="process start time, UNIX seconds")
    sent_at: float
    routes: list[RouteInfo] = []
    sdk_version: str
    heartbeat_interval_s: float


class Heartbeat(_Wire):
    """Proof of life of a worker, sent every heartbeat interval."""

    type: Literal["heartbeat"] = "heartbeat"
    node: str
    service: str
    instance: int
    pid: int
    seq: int
    sent_at: float
    started_at: float
    loop_lag_ms: float
    in_flight: int
    processed: int
    failed: int
    rss_bytes: int


class Goodbye(_Wire):
    """A worker stops cleanly."""

    type: Literal["goodbye"] = "goodbye"
    node: str
    service: str
    instance: int
    pid: int
    sent_at: float
    reason: str = "stopped"


class Command(_Wire):
    """A signed request to a supervisor or a worker.

    `id` is a random nonce that a receiver accepts once; `issued_at` is the
    sender's clock in UNIX seconds, checked against the receiver's window.
    `target` is the routing key the sender addressed, so that a command
    captured on its way to one receiver is rejected by another; `expires_at`
    is when the sender stops waiting, after which the command must not run.
    """

    type: Literal["command"] = "command"
    id: str = Field(min_length=16, max_length=64)
    issued_at: float
    sender: str = Field(max_length=200)
    name: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = {}
    target: str | None = Field(default=None, max_length=300)
    expires_at: float | None = None


class Reply(_Wire):
    """The reply of one supervisor or worker to a command."""

    type: Literal["reply"] = "reply"
    command_id: str
    node: str
    ok: bool
    result: Any = None
    error: str | None = None


class Event(_Wire):
    """Something happened to a service instance or a supervisor."""

    type: Literal["event"] = "event"
    id: str
    time: float
    node: str
    kind: str
    service: str | None = None
    instance: int | None = None
    data: dict[str, Any] = {}


class NodeStatus(_Wire):
    """The presence of a supervisor: state "up" while it runs, "down" when it stops."""

    type: Literal["node"] = "node"
    node: str
    pid: int
    host: str
    version: str
    started_at: float
    sent_at: float
    state: Literal["up", "down"] = "up"
    dashboard_url: str | None = None


ControlMessage = Annotated[
    Hello | Heartbeat | Goodbye | Command | Reply | Event | NodeStatus,
    Field(discriminator="type"),
]
# Older mypy releases reject an Annotated union here; newer ones accept it.
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ControlMessage)  # type: ignore[arg-type, unused-ignore]


class WireError(ValueError):
    """A control message is not valid JSON or does not match its format."""


def decode(data: bytes) -> Hello | Heartbeat | Goodbye | Command | Reply | Event | NodeStatus:
    """Decode any control message; raise WireError with the reason."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("v") != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {raw.get('v')!r}; expected {PROTOCOL_VERSION}")
    try:
        message: Hello | Heartbeat | Goodbye | Command | Reply | Event | NodeStatus = (
            _ADAPTER.validate_python(raw)
        )
        return message
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise WireError(f"invalid message: {detail}") from None
