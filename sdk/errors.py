"""The exceptions of the SDK.

`Reject` and `Retry` are raised by handlers to choose a message's outcome;
the others are raised to callers.
"""

from __future__ import annotations

from typing import Any


class MrqError(Exception):
    """Base class of every error that mrq raises."""


class SettingsError(MrqError, ValueError):
    """A setting has an invalid value; the message names the setting and its source."""


class DefinitionError(MrqError, TypeError):
    """A service, route or handler is defined in a way mrq cannot run."""


class BrokerUnavailable(MrqError, ConnectionError):
    """The broker could not be reached within the configured time."""


class NoRoute(MrqError):
    """The broker has no queue bound for the target, so the message was not sent."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            f"no queue is bound to {routing_key!r} on exchange {exchange!r}: "
            "check the target name, or start the service that consumes it"
        )


class TopologyError(MrqError):
    """A queue or exchange exists on the broker with other arguments than requested."""

    def __init__(self, kind: str, name: str, detail: str) -> None:
        self.kind = kind
        self.name = name
        self.detail = detail
        super().__init__(
            f"{kind} {name!r} already exists with other arguments ({detail}); "
            f"delete the {kind} or change the setting so that both agree"
        )


class RemoteError(MrqError):
    """A called handler failed; `type` and `message` describe the remote exception."""

    def __init__(
        self,
        target: str,
        type: str,
        message: str,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        self.target = target
        self.type = type
        self.message = message
        self.errors = errors or []
        super().__init__(f"{target} raised {type}: {message}")


class RpcTimeout(MrqError, TimeoutError):
    """No reply arrived in time. The request may still be processed."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        super().__init__(
            f"no reply from {target!r} within {timeout_s:g} s; the request may still be processed"
        )


class ReplyLost(MrqError, ConnectionError):
    """The connection closed while a call waited for its reply."""

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__(
            f"the broker connection closed while waiting for the reply from {target!r}; "
            "the request may still be processed"
        )


class Reject(MrqError):
    """Raised by a handler: send the message to its dead-letter queue now, without retries."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        self.reason = reason
        super().__init__(reason)


class Retry(MrqError):
    """Raised by a handler: process the message again after `delay_s` seconds.

    The attempt counts towards the route's limit, so a message that asks for
    retries forever still ends in the dead-letter queue.
    """

    def __init__(self, delay_s: float = 1.0, reason: str = "retry requested by handler") -> None:
        if not 0 <= delay_s < float("inf"):
            raise ValueError(f"Retry delay_s must be a finite number >= 0, got {delay_s!r}")
        self.delay_s = delay_s
        self.reason = reason
        super().__init__(f"{reason} (in {delay_s:g} s)")


class HandlerTimeout(MrqError, TimeoutError):
    """A handler ran longer than its route's `timeout_s` (or the `handler_timeout_s` setting)."""


class BadMessage(MrqError):
    """A body could not be decoded or validated for its handler."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.errors = errors or []
        super().__init__(message)


class SignatureError(MrqError):
    """A signed control message was rejected. The message gives the reason."""
