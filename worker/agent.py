"""One worker process: serve the services, announce them, send heartbeats, obey commands, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from loguru import logger

from sdk import __version__, names
from sdk.codec import JSON
from sdk.runtime import ServiceHost
from sdk.service import ServiceSpec
from sdk.settings import SettingsModel
from sdk.wire import Command, Goodbye, Hello
from worker import procinfo
from worker.control import ControlListener
from worker.health import HeartbeatSender, LagMonitor


class Worker:
    """Runs a `ServiceHost` as a supervised instance until a signal or a stop command."""

    def __init__(self, specs: list[ServiceSpec], settings: SettingsModel) -> None:
        self.settings = settings
        self.identity = (settings.node, settings.service_name or specs[0].name, settings.instance)
        self.host = ServiceHost(specs, settings, role="worker")
        self.lag = LagMonitor()
        self.heartbeats = HeartbeatSender(self.host, self.identity, self.lag)
        self.stop_requested = asyncio.Event()
        self.stop_reason = "stopped"

    async def run(self) -> None:
        self._install_signal_handlers()
        await self.host.start()
        try:
            # A publish to a missing exchange makes the broker close the channel that also carries
            # RPC replies, so the control exchange must exist before the first hello or heartbeat.
            await self.host.broker.declare_exchange(self.settings.control_exchange)
            await self._start_control()
            await self._publish_hello()
            self._log_serving()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.lag.run())
                tasks.create_task(self.heartbeats.run())
                await self.stop_requested.wait()
                logger.info("draining reason={} in_flight={}", self.stop_reason, self.host.stats.in_flight)
                await self.host.drain()
                await self._publish_goodbye()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            await self.host.close()
        stats = self.host.stats
        logger.info("stopped processed={} failed={}", stats.processed, stats.failed)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_requested.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if self.stop_requested.is_set():
                logger.warning("second signal, exiting now signal={}", name)
                os._exit(128 + signum)
            self.request_stop(f"signal {name}")

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    async def _start_control(self) -> None:
        key = self.settings.cluster_key_bytes()
        if key is None:
            logger.warning("control commands disabled: no cluster key (set MRQ_CLUSTER_KEY)")
            return
        control = ControlListener(self.host, self.identity, key)
        control.register("ping", self._ping)
        control.register("stats", self._stats)
        control.register("hello", self._hello)
        control.register("drain", self._drain)
        control.register("stop", self._stop)
        await control.start()

    def hello(self) -> Hello:
        node, service, instance = self.identity
        return Hello(
            node=node,
            service=service,
            instance=instance,
            pid=os.getpid(),
            started_at=self.heartbeats.started_at,
            sent_at=time.time(),
            routes=self.host.route_infos(),
            sdk_version=__version__,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )

    async def _publish_hello(self) -> None:
        node, service, instance = self.identity
        await self._publish(names.hello_key(node, service, instance), self.hello().to_json())

    async def _publish_goodbye(self) -> None:
        node, service, instance = self.identity
        goodbye = Goodbye(
            node=node,
            service=service,
            instance=instance,
            pid=os.getpid(),
            sent_at=time.time(),
            reason=self.stop_reason,
        )
        await self._publish(names.goodbye_key(node, service, instance), goodbye.to_json())

    async def _publish(self, routing_key: str, body: bytes) -> None:
        broker = self.host.broker
        properties = broker.properties(content_type=JSON, persistent=False)
        await broker.publish_nowait(self.settings.control_exchange, routing_key, body, properties)

    def _log_serving(self) -> None:
        logger.info(
            "serving services={} node={} instance={} broker={} pid={}",
            ",".join(spec.name for spec in self.host.specs),
            self.settings.node,
            self.settings.instance,
            self.settings.masked_broker_url(),
            os.getpid(),
        )
        for info in self.host.route_infos():
            logger.info("route service={} queue={} kind={}", info.service, info.queue, info.kind)

    # Command handlers.

    async def _ping(self, _command: Command) -> dict[str, Any]:
        return self.hello().model_dump()

    async def _stats(self, _command: Command) -> dict[str, Any]:
        stats = self.host.stats
        return {
            "processed": stats.processed,
            "failed": stats.failed,
            "in_flight": stats.in_flight,
            "rss_bytes": procinfo.rss_bytes(),
            "heartbeat_seq": self.heartbeats.seq,
            "uptime_s": round(time.time() - self.heartbeats.started_at, 3),
        }

    async def _hello(self, _command: Command) -> dict[str, Any]:
        await self._publish_hello()
        return {"announced": True}

    async def _drain(self, _command: Command) -> dict[str, Any]:
        await self.host.drain()
        return {"drained": True, "in_flight": self.host.stats.in_flight}

    async def _stop(self, command: Command) -> dict[str, Any]:
        self.request_stop(f"stop command from {command.sender}")
        return {"stopping": True}


class _Stopped(Exception):
    """Ends the worker's task group after a clean stop."""
