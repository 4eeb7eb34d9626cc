"""`/metrics` of a real supervisor, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from supkit import supervisor_kit
from test_dashboard import CONSOLE_MODULE, DashboardRun, start_with_dashboard

STATES = ("stopped", "starting", "running", "unhealthy", "stopping", "backoff", "exited", "fatal")


@pytest.fixture
def dash(tmp_path: Path, broker_url: str, unique: str) -> Iterator[DashboardRun]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        kit.write_module("desk", CONSOLE_MODULE)
        yield start_with_dashboard(kit, {kit.service("desk"): {"module": "desk", "replicas": 2}})


def scrape(dash: DashboardRun) -> dict[str, list[Sample]]:
    """Return the samples of every metric family, by family name."""
    with dash.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def by_instance(samples: list[Sample], name: str) -> dict[str, float]:
    """Return one sample's value per instance label, for the samples called `name`."""
    return {s.labels["instance"]: s.value for s in samples if s.name == name}


def wait_for_scrape(
    dash: DashboardRun, predicate: object, what: str, timeout_s: float = 60.0
) -> dict[str, list[Sample]]:
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(dash)
        if predicate(families):  # type: ignore[operator]
            return families
        if time.monotonic() > deadline:
            shown = {name: [(s.labels, s.value) for s in samples] for name, samples in families.items()}
            raise AssertionError(f"/metrics showed no {what} within {timeout_s:g} s: {shown}")
        time.sleep(0.2)


@pytest.mark.timeout(90)
def test_metrics_cover_instances_and_supervisor(dash: DashboardRun) -> None:
    service = dash.kit.service("desk")
    node = dash.kit.node
    # CPU and memory appear once the supervisor sampled the processes (every 5 s at most).
    families = wait_for_scrape(
        dash, lambda f: len(f["mrq_instance_resident_memory_bytes"]) == 2, "sampled instances"
    )

    states = families["mrq_instance_state"]
    for index in ("0", "1"):
        mine = {s.labels["state"]: s.value for s in states if s.labels["instance"] == index}
        assert set(mine) == set(STATES)
        assert mine["running"] == 1.0
        assert sum(mine.values()) == 1.0
    for sample in states:
        assert sample.labels["node"] == node
        assert sample.labels["service"] == service

    assert by_instance(families["mrq_instance_restarts"], "mrq_instance_restarts_total") == {
        "0": 0.0,
        "1": 0.0,
    }
    rss = by_instance(families["mrq_instance_resident_memory_bytes"], "mrq_instance_resident_memory_bytes")
    assert all(value > 1_000_000 for value in rss.values()), rss
    cpu = by_instance(families["mrq_instance_cpu_percent"], "mrq_instance_cpu_percent")
    assert set(cpu) == {"0", "1"}
    ages = by_instance(families["mrq_instance_heartbeat_age_seconds"], "mrq_instance_heartbeat_age_seconds")
    assert all(0 <= age < 5 for age in ages.values()), ages
    lags = by_instance(families["mrq_instance_loop_lag_seconds"], "mrq_instance_loop_lag_seconds")
    assert all(0 <= lag < 1 for lag in lags.values()), lags
    assert set(by_instance(families["mrq_instance_processed"], "mrq_instance_processed_total")) == {"0", "1"}
    assert set(by_instance(families["mrq_instance_failed"], "mrq_instance_failed_total")) == {"0", "1"}

    [own_cpu] = families["mrq_supervisor_cpu_percent"]
    [own_rss] = families["mrq_supervisor_resident_memory_bytes"]
    [connected] = families["mrq_supervisor_broker_connected"]
    assert own_cpu.labels == {"node": node}
    assert own_rss.value > 1_000_000
    assert connected.value == 1.0
    [info] = families["mrq_supervisor_info"]
    assert info.labels["node"] == node
    assert info.labels["version"]
    assert info.value == 1.0


@pytest.mark.timeout(120)
def test_metrics_follow_calls_failures_and_restarts(dash: DashboardRun) -> None:
    service = dash.kit.service("desk")
    with dash.client() as client:
        for number in range(6):
            assert client.post("/api/call", json={"route": f"{service}.echo", "body": number}).json()["ok"]
        for number in range(2):
            assert not client.post("/api/call", json={"route": f"{service}.fail", "body": number}).json()[
                "ok"
            ]

    def counted(families: dict[str, list[Sample]]) -> bool:
        processed = by_instance(families["mrq_instance_processed"], "mrq_instance_processed_total")
        failed = by_instance(families["mrq_instance_failed"], "mrq_instance_failed_total")
        # `processed` counts the handlers that succeeded; the start-up ping adds one more.
        return sum(processed.values()) >= 6 and sum(failed.values()) >= 2

    wait_for_scrape(dash, counted, "6 processed and 2 failed messages")

    victim = next(row for row in dash.instances() if row["instance"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted(families: dict[str, list[Sample]]) -> bool:
        restarts = by_instance(families["mrq_instance_restarts"], "mrq_instance_restarts_total")
        running = {
            s.labels["instance"]: s.value
            for s in families["mrq_instance_state"]
            if s.labels["state"] == "running"
        }
        return restarts.get("1") == 1.0 and running.get("1") == 1.0

    families = wait_for_scrape(dash, restarted, "a restart of instance 1")
    assert by_instance(families["mrq_instance_restarts"], "mrq_instance_restarts_total")["0"] == 0.0
