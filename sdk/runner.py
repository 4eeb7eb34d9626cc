"""`run()`: serve the registered services in this process until a signal."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from loguru import logger

from sdk.runtime import ServiceHost
from sdk.service import Service, ServiceSpec, registry
from sdk.settings import SettingsModel, settings


def run(*services: type[Service], **overrides: Any) -> None:
    """Run every registered service (or the given classes) on uvloop until SIGINT or SIGTERM.

    On the first signal it stops consuming, lets the handlers in flight finish
    within `stop_timeout_s`, acks them and closes; a second signal exits at once.
    Keyword arguments override settings (`broker_url`, `prefetch`, ...).
    `run()` is the program's entry point, so it turns on the SDK's log lines.
    """
    import uvloop

    logger.enable("sdk")
    resolved = settings.resolve(**overrides)
    specs = _select(services, resolved)
    uvloop.run(serve(specs, resolved))


def _select(services: tuple[type[Service], ...], resolved: SettingsModel) -> list[ServiceSpec]:
    specs = registry.specs(resolved.service_name)
    if not services:
        return specs
    wanted = {cls.__dict__.get("name") for cls in services}
    return [spec for spec in specs if spec.name in wanted]


async def serve(specs: list[ServiceSpec], resolved: SettingsModel, stop: asyncio.Event | None = None) -> None:
    """Serve `specs` until `stop` is set or the process gets SIGINT or SIGTERM."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second signal, exiting now signal={}", signal.Signals(signum).name)
            os._exit(130 if signum == signal.SIGINT else 143)
        logger.info("stopping signal={}", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        host = ServiceHost(specs, resolved)
        await host.start()
        _log_serving(host, resolved)
        await stop.wait()
        await host.stop()
        logger.info("stopped processed={} failed={}", host.stats.processed, host.stats.failed)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _log_serving(host: ServiceHost, resolved: SettingsModel) -> None:
    logger.info(
        "serving services={} broker={} exchange={}",
        ",".join(spec.name for spec in host.specs),
        resolved.masked_broker_url(),
        resolved.exchange,
    )
    for info in host.route_infos():
        logger.info("route service={} queue={} kind={}", info.service, info.queue, info.kind)
