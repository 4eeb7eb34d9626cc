"""`/metrics`: the node's instances and the supervisor itself, in the Prometheus text format.

A custom collector reads the node's figures at each scrape, so nothing is kept in
prometheus_client's global registry. Each node exports its own instances only:
scrape every node's dashboard to see the whole cluster without counting twice.
Units follow Prometheus conventions: seconds and bytes, so the loop lag that
heartbeats carry in milliseconds is exported in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sdk import __version__
from supervisor.policy import State

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from supervisor.node import Node

__all__ = ["CONTENT_TYPE", "NodeCollector", "metrics_registry", "render"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
INSTANCE_LABELS: Final = ["node", "service", "instance"]
# Figures that exist only once psutil has sampled the instance's current process.
_SAMPLED: Final = frozenset({"cpu_percent", "rss_bytes"})


class NodeCollector(Collector):
    """Collects the figures of one node's instances and of its supervisor process."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        rows = []
        for instance in self.node.instances():
            row = instance.snapshot()
            sampled_at, started_at = instance.metrics.sampled_at, instance.started_at or 0.0
            # The figures stay from the previous process until the first sample of the new one.
            row["sampled"] = row["pid"] is not None and sampled_at > 0 and sampled_at >= started_at
            rows.append(row)
        yield from _instance_metrics(rows)
        yield from _supervisor_metrics(self.node)


def _gauge(name: str, documentation: str, labels: list[str] = INSTANCE_LABELS) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _counter(name: str, documentation: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=INSTANCE_LABELS)


def _instance_metrics(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    state = _gauge(
        "mrq_instance_state",
        "1 for the instance's current state, 0 for every other state.",
        [*INSTANCE_LABELS, "state"],
    )
    figures: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "restarts": _counter(
            "mrq_instance_restarts", "Restarts of the instance since the supervisor started."
        ),
        "processed": _counter(
            "mrq_instance_processed", "Messages whose handler succeeded in the current process."
        ),
        "failed": _counter("mrq_instance_failed", "Messages whose handler failed in the current process."),
        "in_flight": _gauge("mrq_instance_in_flight", "Messages being handled now."),
        "cpu_percent": _gauge(
            "mrq_instance_cpu_percent", "CPU use of the process tree, in percent of one core."
        ),
        "rss_bytes": _gauge("mrq_instance_resident_memory_bytes", "Resident memory of the process tree."),
        "uptime_s": _gauge("mrq_instance_uptime_seconds", "Time since the current process started."),
        "heartbeat_age_s": _gauge("mrq_instance_heartbeat_age_seconds", "Age of the last heartbeat."),
        "loop_lag_s": _gauge("mrq_instance_loop_lag_seconds", "Event-loop lag the last heartbeat reported."),
    }
    for row in rows:
        labels = [row["node"], row["service"], str(row["instance"])]
        for name in State:
            state.add_metric([*labels, str(name)], 1.0 if row["state"] == name else 0.0)
        values = {**row, "loop_lag_s": _ms_to_s(row.get("loop_lag_ms"))}
        for key, family in figures.items():
            value = values.get(key)
            if value is None or (key in _SAMPLED and not row["sampled"]):
                continue  # unknown figures are left out, never exported as 0
            family.add_metric(labels, float(value))
    yield state
    yield from figures.values()


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def _supervisor_metrics(node: Node) -> Iterator[Metric]:
    labels = [node.node]
    info = _gauge(
        "mrq_supervisor_info", "Always 1; the labels name the node and the mrq version.", ["node", "version"]
    )
    info.add_metric([node.node, __version__], 1.0)
    yield info
    gauges = [
        (
            "mrq_supervisor_cpu_percent",
            "CPU use of the supervisor process, in percent of one core.",
            node.own_cpu_percent,
        ),
        (
            "mrq_supervisor_resident_memory_bytes",
            "Resident memory of the supervisor process.",
            node.own_rss_bytes,
        ),
        (
            "mrq_supervisor_start_time_seconds",
            "Start time of the supervisor, in seconds since the epoch.",
            node.started_at,
        ),
        (
            "mrq_supervisor_broker_connected",
            "1 while the supervisor is connected to the broker.",
            1.0 if node.broker_connected else 0.0,
        ),
    ]
    for name, documentation, value in gauges:
        family = _gauge(name, documentation, ["node"])
        family.add_metric(labels, float(value))
        yield family


def metrics_registry(node: Node) -> CollectorRegistry:
    """Return a registry of its own that holds only the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Return the registry's metrics in the Prometheus text format 0.0.4."""
    return generate_latest(registry)
