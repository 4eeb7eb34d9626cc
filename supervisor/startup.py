"""Start-up output: the services known from the registry, progress, the ping, the final table."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from sdk.errors import MrqError
from supervisor.console import console, print_line, services_table
from supervisor.instance import Instance
from supervisor.policy import State
from supervisor.registry import InstanceRecord, ServiceRecord

if TYPE_CHECKING:
    from supervisor.node import Node

_SETTLED_AT_START = frozenset({State.RUNNING, State.FATAL, State.EXITED})
_PING_TIMEOUT_S = 5.0
_STATE_ORDER = ["fatal", "unhealthy", "backoff", "exited", "starting", "stopping", "stopped", "running"]


class Startup:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.began = time.monotonic()

    def show_known_services(self, services: list[ServiceRecord], instances: list[InstanceRecord]) -> None:
        """Print what the registry knew before this start, before anything else happens."""
        if not services:
            return
        rows = []
        for service in services:
            mine = [i for i in instances if i.service == service.name]
            rows.append(
                {
                    "service": service.name,
                    "instances": str(service.replicas),
                    "state": _worst([i.state for i in mine]) if mine else "stopped",
                    "pids": ",".join(str(i.pid) for i in mine if i.pid) or "-",
                    "routes": _routes_text([r.queue for r in service.routes]),
                    "ready": "-",
                    "ping": "-",
                }
            )
        console().print(services_table(rows, title="Known services (from the registry, before this start)"))

    async def wait_ready_and_report(self) -> None:
        """Show progress until every instance is ready or settled, then ping and print the table."""
        node = self.node
        limit_s = node.settings.start_timeout_s + 5.0
        await self._progress(limit_s)
        if node.stop_requested.is_set():
            logger.info("start-up interrupted by a stop request node={}", node.node)
            return
        pings = await self._ping_services()
        console().print(services_table(self._rows(pings), title=f"Services on node {node.node}"))
        url = getattr(node, "dashboard_url", None)
        if url:
            print_line(f"Dashboard: {url}")
        ready = sum(1 for i in node.instances() if i.state == State.RUNNING)
        logger.info(
            "supervisor ready node={} instances_running={} instances={} startup_s={:.2f}",
            node.node,
            ready,
            len(node.instances()),
            time.monotonic() - self.began,
        )

    async def _progress(self, limit_s: float) -> None:
        node = self.node
        total = len(node.instances())
        deadline = time.monotonic() + limit_s
        shown = -1
        status = console().status("", spinner="dots") if sys.stdout.isatty() else None
        if status is not None:
            status.start()
        try:
            while time.monotonic() < deadline:
                if node.stop_requested.is_set():
                    return
                instances = node.instances()
                ready = sum(1 for i in instances if i.state == State.RUNNING)
                settled = all(_settled(i) for i in instances)
                text = f"starting instances: {ready}/{total} ready"
                if status is not None:
                    status.update(text)
                elif ready != shown:
                    print_line(text)
                shown = ready
                if settled:
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await node.wait_for(_count_changes(node, ready))
            print_line(
                f"start timeout: {shown}/{total} ready after {limit_s:.0f} s; see `mrq-supervisor status`"
            )
        finally:
            if status is not None:
                status.stop()

    async def _ping_services(self) -> dict[str, str]:
        node = self.node
        messenger = node.messenger
        results: dict[str, str] = {}
        if messenger is None:
            return results
        for name, group in node.groups.items():
            if group.config.kind != "python" or not any(i.state == State.RUNNING for i in group.instances):
                continue
            parts = []
            for service in _sdk_services(group.instances) or [name]:
                began = time.perf_counter()
                try:
                    await messenger.call(f"{service}._ping", None, timeout=_PING_TIMEOUT_S)
                except (MrqError, TimeoutError) as exc:
                    parts.append(f"{service}: {type(exc).__name__}")
                    logger.warning("ping failed service={} error={}", service, exc)
                    continue
                parts.append(f"{(time.perf_counter() - began) * 1000:.1f} ms")
            results[name] = ", ".join(parts)
        return results

    def _rows(self, pings: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for name, group in self.node.groups.items():
            instances = group.instances
            running = sum(1 for i in instances if i.state == State.RUNNING)
            startup = [i.startup_s for i in instances if i.startup_s is not None]
            routes = [r.queue for r in self.node.routes.get(name, [])]
            rows.append(
                {
                    "service": name,
                    "instances": f"{running}/{len(instances)}",
                    "state": _worst([str(i.state) for i in instances]) if instances else "stopped",
                    "pids": ",".join(str(i.pid) for i in instances if i.pid) or "-",
                    "routes": _routes_text(routes) if group.config.kind == "python" else "(program)",
                    "ready": f"{max(startup) * 1000:.0f} ms" if startup else "-",
                    "ping": pings.get(name, "-"),
                }
            )
        return rows


def _settled(instance: Instance) -> bool:
    if instance.state == State.STOPPED:
        return not instance.desired_up
    return instance.state in _SETTLED_AT_START


def _ready_count(node: Node) -> int:
    return sum(1 for i in node.instances() if i.state == State.RUNNING)


def _count_changes(node: Node, count: int) -> Callable[[], bool]:
    return lambda: _ready_count(node) != count


def _sdk_services(instances: list[Instance]) -> list[str]:
    for instance in instances:
        if instance.hello is not None:
            return sorted({route.service for route in instance.hello.routes})
    return []


def _routes_text(queues: list[str]) -> str:
    return ", ".join(sorted(queues)) or "-"


def _worst(states: list[str]) -> str:
    for state in _STATE_ORDER:
        if state in states:
            return state
    return states[0] if states else "-"
