"""Heartbeats and event-loop lag of a worker."""

from __future__ import annotations

import asyncio
import os
import time

from loguru import logger

from sdk import names
from sdk.codec import JSON
from sdk.runtime import ServiceHost
from sdk.wire import Heartbeat
from worker import procinfo

_LAG_TICK_S = 0.1


class LagMonitor:
    """Measures how late the event loop runs a timer: the longest delay since the last read."""

    def __init__(self) -> None:
        self._max_lag_s = 0.0

    def take_ms(self) -> float:
        """Return the largest lag seen since the previous call, in milliseconds, and reset it."""
        lag, self._max_lag_s = self._max_lag_s, 0.0
        return round(lag * 1000, 3)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + _LAG_TICK_S
            await asyncio.sleep(_LAG_TICK_S)
            lag = loop.time() - expected
            if lag > self._max_lag_s:
                self._max_lag_s = lag


class HeartbeatSender:
    """Publishes a heartbeat every interval; each one expires in the broker when it is stale."""

    def __init__(self, host: ServiceHost, identity: tuple[str, str, int], lag: LagMonitor) -> None:
        self.host = host
        self.node, self.service, self.instance = identity
        self.lag = lag
        self.seq = 0
        self.pid = os.getpid()
        self.started_at = procinfo.start_time()
        settings = host.settings
        self.interval_s = settings.heartbeat_interval_s
        self.expiration_ms = max(int(settings.heartbeat_interval_s * settings.heartbeat_misses * 1000), 1)
        self.exchange = settings.control_exchange
        self.routing_key = names.heartbeat_key(self.node, self.service, self.instance)
        self.first_sent = asyncio.Event()

    def build(self) -> Heartbeat:
        stats = self.host.stats
        self.seq += 1
        return Heartbeat(
            node=self.node,
            service=self.service,
            instance=self.instance,
            pid=self.pid,
            seq=self.seq,
            sent_at=time.time(),
            started_at=self.started_at,
            loop_lag_ms=self.lag.take_ms(),
            in_flight=stats.in_flight,
            processed=stats.processed,
            failed=stats.failed,
            rss_bytes=procinfo.rss_bytes(),
        )

    async def send(self) -> bool:
        broker = self.host.broker
        properties = broker.properties(content_type=JSON, persistent=False, expiration_ms=self.expiration_ms)
        return await broker.publish_nowait(
            self.exchange, self.routing_key, self.build().to_json(), properties
        )

    async def run(self) -> None:
        """Send at once, then every interval, keeping to the schedule rather than drifting."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if await self.send() and not self.first_sent.is_set():
                self.first_sent.set()
                logger.info("ready startup_ms={:.0f}", procinfo.age_s() * 1000)
            next_at += self.interval_s
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
