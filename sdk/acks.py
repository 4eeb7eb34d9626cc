"""Acknowledging deliveries in batches.

One `basic.ack` with `multiple=True` for a run of finished deliveries costs
the client and the broker far less than one ack per message. Handlers finish
out of order, so the tracker acks the longest prefix of finished delivery
tags, and acks finished tags after a gap one by one once enough of them wait.
"""

from __future__ import annotations

import contextlib
from collections import deque

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from loguru import logger

_CLOSED = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


class AckTracker:
    """Tracks the unacknowledged deliveries of one channel."""

    def __init__(self, batch: int) -> None:
        self.batch = max(1, batch)
        self._channel: object | None = None
        self._order: deque[int] = deque()
        self._done: set[int] = set()

    def track(self, message: AbstractIncomingMessage) -> None:
        """Record a new delivery; a delivery on a reopened channel starts a new record."""
        channel = _channel_of(message)
        if channel is None:
            return
        if channel is not self._channel:
            self._channel = channel
            self._order.clear()
            self._done.clear()
        self._order.append(message.delivery_tag or 0)

    async def done(self, message: AbstractIncomingMessage, *, flush: bool) -> None:
        """Mark a delivery finished; ack now when `flush` or when a batch is full."""
        if _channel_of(message) is not self._channel:
            return  # its channel closed: the broker redelivers it
        self._done.add(message.delivery_tag or 0)
        if flush or len(self._done) >= self.batch:
            await self.flush()

    async def requeue(self, message: AbstractIncomingMessage) -> None:
        """Give a delivery back to the broker unprocessed."""
        tag = message.delivery_tag or 0
        if _channel_of(message) is self._channel:
            with contextlib.suppress(ValueError):
                self._order.remove(tag)
        try:
            await message.nack(requeue=True)
        except (*_CLOSED, RuntimeError):
            logger.debug("requeue skipped, channel closed delivery_tag={}", tag)

    async def ack_now(self, message: AbstractIncomingMessage) -> None:
        """Ack one delivery by itself, outside the batch."""
        tag = message.delivery_tag or 0
        if _channel_of(message) is not self._channel:
            return  # its channel closed: the broker redelivers it
        with contextlib.suppress(ValueError):
            self._order.remove(tag)
        self._done.discard(tag)
        try:
            await message.ack()
        except (*_CLOSED, RuntimeError):
            logger.debug("ack skipped, channel closed delivery_tag={}", tag)

    async def flush(self) -> None:
        channel = self._channel
        if channel is None or not self._done:
            return
        last = None
        while self._order and self._order[0] in self._done:
            last = self._order.popleft()
            self._done.discard(last)
        stragglers = sorted(self._done)
        self._done.clear()
        for tag in stragglers:
            with contextlib.suppress(ValueError):
                self._order.remove(tag)
        try:
            if last is not None:
                await channel.basic_ack(last, multiple=True)  # type: ignore[attr-defined]
            for tag in stragglers:
                await channel.basic_ack(tag)  # type: ignore[attr-defined]
        except _CLOSED:
            logger.debug("ack skipped, channel closed; the broker will redeliver")


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """Return the channel a delivery came on, or None when that channel is closed."""
    try:
        return message.channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return None
