"""Names on the wire: exchanges, queues, routing keys, headers and exit codes.

Every name that another process relies on is defined here once.
"""

from __future__ import annotations

import re
from typing import Final

DEFAULT_EXCHANGE: Final = "mrq"
CONTROL_SUFFIX: Final = ".control"
EVENT_PREFIX: Final = "event."
PING_ROUTE: Final = "_ping"

# Headers that mrq sets on application messages.
H_ATTEMPT: Final = "x-mrq-attempt"
H_REDELIVERIES: Final = "x-mrq-redeliveries"
H_STATUS: Final = "x-mrq-status"
H_ERROR_TYPE: Final = "x-mrq-error-type"
H_ERROR_MESSAGE: Final = "x-mrq-error-message"
H_ERROR_REASON: Final = "x-mrq-error-reason"
# Milliseconds since the epoch as an integer: AMQP tables carry floats as 32-bit.
H_FAILED_AT: Final = "x-mrq-failed-at-ms"
H_FAILED_BY: Final = "x-mrq-failed-by"
H_ORIGINAL_ROUTING_KEY: Final = "x-mrq-original-routing-key"
H_SIGNATURE: Final = "x-mrq-signature"

STATUS_OK: Final = "ok"
STATUS_ERROR: Final = "error"

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"

# A worker exits with this code when its configuration is wrong (EX_CONFIG in
# sysexits.h): restarting it cannot help.
EXIT_CONFIG: Final = 78

SERVICE_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ROUTE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
EVENT_PATTERN_RE: Final = re.compile(r"^([A-Za-z0-9_-]+|\*|#)(\.([A-Za-z0-9_-]+|\*|#))*$")
NODE_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
RESERVED_SERVICE_NAMES: Final = frozenset({"event"})


def route_queue(service: str, route: str | None) -> str:
    """Return the queue (and routing key) of a route; None is the default route."""
    return service if not route else f"{service}.{route}"


def event_queue(service: str, pattern: str) -> str:
    """Return the queue through which `service` receives events matching `pattern`.

    AMQP clients reject `*` in queue names, so it becomes `+` (the single-level
    wildcard of MQTT); `#` is allowed and stays.
    """
    return f"{service}.on.{pattern.replace('*', '+')}"


def event_routing_key(event: str) -> str:
    return EVENT_PREFIX + event


def dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def retry_queue(queue: str, delay_ms: int) -> str:
    return f"{queue}.retry.{delay_ms}"


def control_exchange(exchange: str) -> str:
    return exchange + CONTROL_SUFFIX


# Routing keys on the control exchange.
def hello_key(node: str, service: str, instance: int) -> str:
    return f"hello.{node}.{service}.{instance}"


def goodbye_key(node: str, service: str, instance: int) -> str:
    return f"goodbye.{node}.{service}.{instance}"


def heartbeat_key(node: str, service: str, instance: int) -> str:
    return f"heartbeat.{node}.{service}.{instance}"


def worker_command_key(node: str, service: str, instance: int) -> str:
    return f"worker.{node}.{service}.{instance}"


def supervisor_command_key(node: str | None) -> str:
    """Return the key of one supervisor's commands, or of all (node None)."""
    return f"supervisor.{node or 'all'}"


def supervisor_event_key(node: str, kind: str) -> str:
    return f"event.{node}.{kind}"


def supervisor_presence_key(node: str) -> str:
    return f"node.{node}"
