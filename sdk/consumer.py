"""Consuming a route: decode, validate, call the handler, then ack, retry or dead-letter.

Outcomes of a delivery:
- the handler returns: the reply goes out (for a call), then the delivery is acked;
- the body cannot be decoded or validated, or the handler raises `Reject`: the
  message goes to `<queue>.dead` with the reason in its headers;
- the handler raises `Retry(delay_s)` or another exception: a copy with the
  next attempt number goes through `<queue>.retry.<ms>` and comes back after
  the delay; after the last attempt the message is dead-lettered instead.
  A call is answered with the error at once and not retried, so the caller
  decides. Only `Retry` retries a call, and its last failure is answered too;
- the broker redelivers a message (its consumer died or lost the connection
  mid-handler): a copy with a higher redelivery count replaces it, so a message
  that kills its consumer ends in the dead-letter queue and never loops forever.
Every copy keeps the body, content type, correlation id, reply-to address and
message id of the original, and is published with a confirm before the
original is acked.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustQueue
from loguru import logger

from sdk import codec, names
from sdk.context import Context
from sdk.errors import BadMessage, HandlerTimeout, MrqError, NoRoute, Reject, Retry
from sdk.handler import Invoker
from sdk.service import RouteSpec

if TYPE_CHECKING:
    from sdk.runtime import ServiceRunner


# A counted copy of a redelivered message waits at least this long before it comes back.
_REDELIVERY_DELAY_MS = 500
_GIVE_BACK_TIMEOUT_S = 2.0


class RouteConsumer:
    """Consumes the queue of one route (or event subscription) of a service."""

    def __init__(self, runner: ServiceRunner, spec: RouteSpec, invoker: Invoker) -> None:
        self.runner = runner
        self.spec = spec
        self.invoker = invoker
        service = runner.spec.name
        self.service = service
        self.queue_name = spec.queue(service)
        self.dead_queue = names.dead_queue(self.queue_name)
        self.label = spec.label(service)
        settings = runner.settings
        self.max_attempts = 1 + (spec.retries if spec.retries is not None else settings.retries)
        self.retry_delay_s = spec.retry_delay_s if spec.retry_delay_s is not None else settings.retry_delay_s
        self.max_redeliveries = settings.max_redeliveries
        self.timeout_s = spec.timeout_s if spec.timeout_s is not None else settings.handler_timeout_s
        self.queue: AbstractRobustQueue | None = None
        self.consumer_tag: str | None = None

    async def declare(self) -> None:
        runner = self.runner
        broker = runner.broker
        arguments = {"x-queue-type": "quorum"} if runner.queue_type == "quorum" else None
        self.queue = await broker.declare_queue(runner.channel, self.queue_name, arguments=arguments)
        await self.queue.bind(runner.settings.exchange, self.spec.binding_key(self.service))
        await broker.declare_queue(broker.publisher, self.dead_queue, arguments=arguments)

    async def start(self) -> None:
        assert self.queue is not None
        self.consumer_tag = await self.queue.consume(self.runner.dispatch_to(self))

    async def cancel(self) -> None:
        if self.queue is None or self.consumer_tag is None:
            return
        tag, self.consumer_tag = self.consumer_tag, None
        try:
            await asyncio.wait_for(self.queue.cancel(tag), 5.0)
        except Exception as exc:
            logger.debug("consumer cancel failed queue={} error={}", self.queue_name, exc)

    # Processing one delivery.

    async def process(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        if message.redelivered and await self._count_redelivery(message, headers):
            return
        attempt = _int_header(headers, names.H_ATTEMPT, 1)
        try:
            body = self.invoker.convert(codec.decode(message.body, message.content_type))
        except BadMessage as exc:
            await self._bad_input(message, exc)
            return
        ctx = Context(
            messenger=self.runner.messenger,
            message=message,
            body=body,
            service=self.service,
            route=self.spec.name,
            attempt=attempt,
        )
        # A redelivered message is replaced by a counted copy, which the broker does not flag.
        ctx.redelivered = ctx.redelivered or _int_header(headers, names.H_REDELIVERIES, 0) > 0
        try:
            if self.timeout_s is None:
                result = await self.invoker(ctx, body)
            else:
                async with asyncio.timeout(self.timeout_s):
                    result = await self.invoker(ctx, body)
        except TimeoutError as exc:
            if self.timeout_s is None:
                await self._failed(message, attempt, exc)
            else:
                timed_out = HandlerTimeout(f"the handler ran longer than timeout_s={self.timeout_s:g}")
                await self._failed(message, attempt, timed_out)
        except Reject as exc:
            await self._reject(message, exc)
        except Retry as exc:
            await self._retry(message, attempt, exc.delay_s, exc.reason, exc)
        except Exception as exc:
            await self._failed(message, attempt, exc)
        else:
            if message.reply_to:
                await self._reply(message, result)
            self.runner.stats.processed += 1
            await self.runner.settle(message)

    async def _count_redelivery(self, message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> bool:
        """Replace a redelivered message by a copy that counts the redelivery; True when done."""
        count = _int_header(headers, names.H_REDELIVERIES, 0) + 1
        if count > self.max_redeliveries:
            reason = (
                f"delivered {count} times without an ack: its consumer died or lost the "
                "connection while handling it each time"
            )
            await self._dead_letter(message, "Redelivered", reason, None)
            return True
        copy = {**headers, names.H_REDELIVERIES: count}
        # The copy waits in a delay queue: sent straight back, it could reach this process
        # and kill it again before the original's ack went out, and both would come back.
        delay_ms = max(int(self.retry_delay_s * 1000), _REDELIVERY_DELAY_MS)
        await self._republish("", await self.runner.retry_queue(self.queue_name, delay_ms), message, copy)
        await self.runner.settle_now(message)
        logger.warning(
            "message redelivered, requeued with a count queue={} redeliveries={} delay_ms={}",
            self.queue_name,
            count,
            delay_ms,
        )
        return True

    async def salvage(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        """Dead-letter a delivery whose outcome failed unexpectedly, or requeue it when that fails too."""
        try:
            await self._dead_letter(message, type(exc).__name__, f"outcome failed: {exc}", exc)
        except Exception as second:
            logger.warning("dead-lettering failed, requeueing queue={} error={}", self.queue_name, second)
            await self.runner.tracker.requeue(message)

    async def give_back(self, message: AbstractIncomingMessage) -> None:
        """Return a delivery that no handler ran (a drain) without marking it redelivered.

        A plain requeue sets the broker's redelivered flag, which would count
        against `max_redeliveries` although nothing went wrong; a fresh copy does not.
        """
        broker = self.runner.broker
        if broker.connected:
            try:
                async with asyncio.timeout(_GIVE_BACK_TIMEOUT_S):
                    await self._republish("", self.queue_name, message, message.headers or {})
                await self.runner.settle_now(message)
                return
            except (TimeoutError, MrqError, ConnectionError) as exc:
                logger.debug("give back failed, requeueing queue={} error={}", self.queue_name, exc)
        await self.runner.tracker.requeue(message)

    async def _bad_input(self, message: AbstractIncomingMessage, exc: BadMessage) -> None:
        logger.error("bad message dead-lettered queue={} error={}", self.queue_name, exc)
        if message.reply_to:
            await self._reply_error(message, "BadMessage", str(exc), exc.errors)
        await self._dead_letter(message, "BadMessage", str(exc), None)

    async def _reject(self, message: AbstractIncomingMessage, exc: Reject) -> None:
        logger.warning("message rejected queue={} reason={}", self.queue_name, exc.reason)
        if message.reply_to:
            await self._reply_error(message, "Reject", exc.reason)
        await self._dead_letter(message, "Reject", exc.reason, None)

    async def _failed(self, message: AbstractIncomingMessage, attempt: int, exc: Exception) -> None:
        error_type = type(exc).__name__
        if message.reply_to:
            logger.opt(exception=exc).error(
                "handler failed, error sent to caller queue={} error_type={}", self.queue_name, error_type
            )
            self.runner.stats.failed += 1
            await self._reply_error(message, error_type, str(exc))
            await self.runner.settle(message)
            return
        delay_s = self.retry_delay_s * 2 ** min(attempt - 1, 32)
        await self._retry(message, attempt, delay_s, f"{error_type}: {exc}", exc)

    async def _retry(
        self, message: AbstractIncomingMessage, attempt: int, delay_s: float, reason: str, exc: Exception
    ) -> None:
        error_type = type(exc).__name__
        if attempt >= self.max_attempts:
            logger.opt(exception=exc).error(
                "handler failed, message dead-lettered queue={} attempts={} error={}",
                self.queue_name,
                attempt,
                reason,
            )
            if message.reply_to:
                await self._reply_error(message, error_type, reason)
            await self._dead_letter(message, error_type, reason, exc)
            return
        logger.warning(
            "handler failed, retrying queue={} attempt={} delay_s={:g} error={}",
            self.queue_name,
            attempt,
            delay_s,
            reason,
        )
        headers = {**(message.headers or {}), names.H_ATTEMPT: attempt + 1}
        # Explicit Retry delays are bounded like computed ones.
        delay_s = min(delay_s, self.runner.settings.retry_delay_max_s)
        delay_ms = max(int(delay_s * 1000), 1)
        retry_queue = await self.runner.retry_queue(self.queue_name, delay_ms)
        await self._republish("", retry_queue, message, headers)
        self.runner.stats.failed += 1
        await self.runner.settle_now(message)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, error_type: str, reason: str, exc: BaseException | None
    ) -> None:
        headers = {
            **(message.headers or {}),
            names.H_ERROR_TYPE: error_type,
            names.H_ERROR_REASON: reason[:4000],
            names.H_FAILED_AT: int(time.time() * 1000),
            names.H_FAILED_BY: self.runner.identity,
            names.H_ORIGINAL_ROUTING_KEY: message.routing_key or "",
        }
        if exc is not None:
            trace = "".join(traceback.format_exception(exc))
            headers[names.H_ERROR_MESSAGE] = trace[-8000:]
        await self._republish("", self.dead_queue, message, headers)
        self.runner.stats.failed += 1
        await self.runner.settle_now(message)

    async def _republish(
        self, exchange: str, routing_key: str, message: AbstractIncomingMessage, headers: Mapping[str, Any]
    ) -> None:
        broker = self.runner.broker
        properties = broker.properties(
            content_type=message.content_type or codec.BINARY,
            headers=headers,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id,
        )
        try:
            await broker.publish(exchange, routing_key, message.body, properties)
        except NoRoute:
            # The queue was deleted under us: declare it again and publish once more.
            await broker.declare_queue(broker.publisher, routing_key)
            await broker.publish(exchange, routing_key, message.body, properties)

    async def _reply(self, message: AbstractIncomingMessage, result: Any) -> None:
        try:
            data, content_type = codec.encode(result)
        except Exception as exc:
            logger.error("reply not encodable queue={} error={}", self.queue_name, exc)
            await self._reply_error(message, type(exc).__name__, f"cannot encode the reply: {exc}")
            return
        headers = {names.H_STATUS: names.STATUS_OK}
        await self._send_reply(message, data, content_type, headers)

    async def _reply_error(
        self,
        message: AbstractIncomingMessage,
        error_type: str,
        text: str,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        payload: dict[str, Any] = {"type": error_type, "message": text}
        if errors:
            payload["errors"] = errors
        headers = {names.H_STATUS: names.STATUS_ERROR}
        await self._send_reply(message, orjson.dumps(payload), codec.JSON, headers)

    async def _send_reply(
        self, message: AbstractIncomingMessage, data: bytes, content_type: str, headers: dict[str, Any]
    ) -> None:
        broker = self.runner.broker
        properties = broker.properties(
            content_type=content_type,
            headers=headers,
            correlation_id=message.correlation_id,
            persistent=False,
        )
        sent = await broker.publish_nowait("", message.reply_to or "", data, properties)
        if not sent:
            logger.warning("reply not sent, broker disconnected queue={}", self.queue_name)


def _int_header(headers: Mapping[str, Any], name: str, default: int) -> int:
    value = headers.get(name, default)
    try:
        return max(int(value), default)
    except (TypeError, ValueError):
        return default
