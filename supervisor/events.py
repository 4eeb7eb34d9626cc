"""Supervisor events: kept in the registry, published on the control exchange, shown live."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from loguru import logger

from sdk import names, signing
from sdk.codec import JSON
from sdk.connection import Broker
from sdk.wire import Event
from supervisor.registry import NewEvent, Registry

_SUBSCRIBER_BACKLOG = 1000


class EventBus:
    """Records an event once and hands it to every place that shows events."""

    def __init__(self, node: str, registry: Registry) -> None:
        self.node = node
        self.registry = registry
        self.broker: Broker | None = None
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._prefix = os.urandom(4).hex()
        self._count = 0

    async def publish(
        self, kind: str, service: str | None = None, instance: int | None = None, **data: Any
    ) -> Event:
        self._count += 1
        event = Event(
            id=f"{self._prefix}-{self._count}",
            time=time.time(),
            node=self.node,
            kind=kind,
            service=service,
            instance=instance,
            data={k: v for k, v in data.items() if v is not None},
        )
        try:
            await self.registry.add_event(
                NewEvent(
                    time=event.time,
                    node=self.node,
                    kind=kind,
                    service=service,
                    instance=instance,
                    data=event.data,
                )
            )
        except Exception as exc:
            logger.warning("event not stored kind={} error={}", kind, exc)
        await self._send(event)
        for queue in tuple(self._subscribers):
            if queue.qsize() < _SUBSCRIBER_BACKLOG:
                queue.put_nowait(event)
        return event

    async def _send(self, event: Event) -> None:
        broker = self.broker
        if broker is None or not broker.connected:
            return
        body = event.to_json()
        # Signed with the cluster key, so that a follower can reject events that anyone else forged.
        cluster_key = broker.settings.cluster_key_bytes()
        headers = signing.sign_headers(cluster_key, body) if cluster_key else None
        properties = broker.properties(content_type=JSON, headers=headers, persistent=False)
        key = names.supervisor_event_key(self.node, event.kind)
        await broker.publish_nowait(broker.settings.control_exchange, key, body, properties)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
