"""Signed control commands addressed to one worker: ping, stats, hello, drain, stop."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from loguru import logger

from sdk import names, signing
from sdk.codec import JSON
from sdk.errors import SignatureError
from sdk.runtime import ServiceHost
from sdk.wire import Command, Reply
from worker import procinfo

_COMMAND_TTL_MS = 30_000
_REJECTION_LOG_INTERVAL_S = 5.0

Handler = Callable[[Command], Awaitable[Any]]


class ControlListener:
    """Consumes the worker's command queue and answers each verified command."""

    def __init__(self, host: ServiceHost, identity: tuple[str, str, int], key: bytes) -> None:
        self.host = host
        self.node, self.service, self.instance = identity
        self.key = key
        settings = host.settings
        # Accept only commands addressed to this instance and issued after this process
        # started, because the nonces that an earlier process of the slot accepted are gone.
        self.verifier = signing.CommandVerifier(
            key,
            max_age_s=settings.command_max_age_s,
            targets={names.worker_command_key(self.node, self.service, self.instance)},
            not_before=time.time() - procinfo.age_s(),
        )
        self.handlers: dict[str, Handler] = {}
        # Rejections of each kind (the reason up to its first colon) since the last line logged
        # for that kind, and the monotonic time of that line.
        self._rejected: dict[str, int] = {}
        self._rejected_logged_at: dict[str, float] = {}

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def start(self) -> None:
        broker = self.host.broker
        exchange = self.host.settings.control_exchange
        await broker.declare_exchange(exchange)
        channel = await broker.channel()
        name = f"mrq.worker.{self.node}.{self.service}.{self.instance}.{os.getpid()}"
        queue = await broker.declare_queue(
            channel,
            name,
            durable=False,
            exclusive=True,
            auto_delete=True,
            arguments={"x-message-ttl": _COMMAND_TTL_MS},
        )
        await queue.bind(exchange, names.worker_command_key(self.node, self.service, self.instance))
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            command = self.verifier.verify(message.body, message.headers)
        except SignatureError as exc:
            self._log_rejection(str(exc), message)
            return
        logger.info("command received name={} sender={} id={}", command.name, command.sender, command.id)
        handler = self.handlers.get(command.name)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            await self._reply(
                message, command, False, None, f"unknown command {command.name!r}; known: {known}"
            )
            return
        try:
            result = await handler(command)
        except Exception as exc:
            logger.exception("command failed name={}", command.name)
            await self._reply(message, command, False, None, f"{type(exc).__name__}: {exc}")
            return
        await self._reply(message, command, True, result, None)

    def _log_rejection(self, reason: str, message: AbstractIncomingMessage) -> None:
        """Log the first rejection of each kind at once, then at most one per kind and interval."""
        # NOTE: rejections counted after the last line of their kind are reported only when
        # another one of that kind arrives after the interval.
        kind = reason.partition(":")[0]
        self._rejected[kind] = self._rejected.get(kind, 0) + 1
        now = time.monotonic()
        last_logged_at = self._rejected_logged_at.get(kind)
        if last_logged_at is not None and now - last_logged_at < _REJECTION_LOG_INTERVAL_S:
            return
        logger.warning(
            "command rejected reason={} rejected_since_last_report={} size={}",
            reason,
            self._rejected.pop(kind),
            len(message.body),
        )
        self._rejected_logged_at[kind] = now

    async def _reply(
        self, message: AbstractIncomingMessage, command: Command, ok: bool, result: Any, error: str | None
    ) -> None:
        if not message.reply_to:
            return
        reply = Reply(command_id=command.id, node=self.node, ok=ok, result=result, error=error)
        body = reply.to_json()
        broker = self.host.broker
        properties = broker.properties(
            content_type=JSON,
            headers=signing.sign_headers(self.key, body),
            correlation_id=message.correlation_id,
            persistent=False,
        )
        await broker.publish_nowait("", message.reply_to, body, properties)
