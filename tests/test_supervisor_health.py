"""The supervisor replaces a hung instance, leaves a slow one alone, and restarts a memory hog.

A hung instance blocks its event loop, so it sends no heartbeat. A slow one awaits a long
handler while its heartbeats go on. Each test runs the real `mrq-supervisor start`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from supkit import HOG_MODULE, WORK_MODULE, SupKit, is_running, supervisor_kit

from sdk import Client

HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_MISSES = 3
# Time for the pull of queued heartbeats, the event's publication and a loaded machine.
DETECTION_MARGIN_S = 3.0


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


def client(kit: SupKit) -> Client:
    return Client(broker_url=kit.broker_url, exchange=kit.exchange)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_hung_instance_detected_and_replaced(kit: SupKit) -> None:
    work = kit.service("work")
    kit.write_module("work", WORK_MODULE)
    kit.write_config(
        {work: {"module": "work", "stop_timeout_s": 1}},
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        heartbeat_misses=HEARTBEAT_MISSES,
    )
    async with kit.watcher() as watcher:
        run = await kit.start()
        running = await watcher.wait_event("instance.running", work, 0)
        hung_pid = watcher.events_of("instance.started", work, 0)[0].data["pid"]
        mark = watcher.mark()
        async with client(kit) as sender:
            await sender.send(f"{work}.hang", str(kit.folder / "hang.flag"))
        entries = await kit.wait_for_journal(lambda e: any(x.event == "hang" for x in e), "hang")
        hung_at = next(x.time for x in entries if x.event == "hang")

        unhealthy = await watcher.wait_event("instance.unhealthy", work, 0, since=mark)
        exited = await watcher.wait_event("instance.exited", work, 0, since=mark)
        replacement = await watcher.wait_event("instance.started", work, 0, since=mark)
        await watcher.wait_event("instance.running", work, 0, since=watcher.events.index(replacement))

    limit_s = HEARTBEAT_INTERVAL_S * HEARTBEAT_MISSES + DETECTION_MARGIN_S
    assert unhealthy.time - hung_at <= limit_s, f"detected after {unhealthy.time - hung_at:.2f} s"
    assert unhealthy.data["cause"] == "unhealthy"
    assert "no heartbeat" in unhealthy.data["reason"]
    # The blocked loop never runs the SIGTERM handler, so only SIGKILL ends the process.
    assert exited.data["signal"] == signal.SIGKILL
    assert exited.data["cause"] == "unhealthy"
    await run.wait_for_log(f"process stop timed out, sending SIGKILL pid={hung_pid} signal=SIGTERM")
    assert replacement.data["pid"] != hung_pid
    assert not is_running(hung_pid)
    assert is_running(replacement.data["pid"])
    assert running.time < unhealthy.time


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_slow_instance_with_heartbeats_left_alone(kit: SupKit) -> None:
    work = kit.service("work")
    kit.write_module("work", WORK_MODULE)
    handler_s = 5.0
    kit.write_config(
        {work: {"module": "work"}},
        heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
        heartbeat_misses=HEARTBEAT_MISSES,
    )
    async with kit.watcher() as watcher:
        await kit.start()
        await watcher.wait_event("instance.running", work, 0)
        pid = watcher.events_of("instance.started", work, 0)[0].data["pid"]
        async with client(kit) as sender:
            await sender.send(f"{work}.slow", handler_s)
        await kit.wait_for_journal(lambda e: any(x.event == "start" for x in e), "handler start")
        during = time.monotonic()
        entries = await kit.wait_for_journal(
            lambda e: any(x.event == "done" for x in e), "handler end", timeout_s=handler_s + 20
        )
        beats_during = watcher.heartbeat_pids(work, since_mono=during)

    assert [x.pid for x in entries if x.event in ("start", "done")] == [pid, pid]
    assert beats_during == {pid}
    assert [e.data["pid"] for e in watcher.events_of("instance.started", work)] == [pid]
    assert not watcher.events_of("instance.unhealthy", work), watcher.describe()
    assert is_running(pid)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_memory_hog_restarted_gracefully(kit: SupKit) -> None:
    hog = kit.service("hog")
    kit.write_module("hog", HOG_MODULE)
    grace_s = 1.0
    kit.write_config(
        {
            hog: {
                "module": "hog",
                "max_memory_mb": 100,
                "max_memory_grace_s": grace_s,
                "stop_timeout_s": 5,
                "env": {"SUPTEST_HOG_MB": "300"},
            }
        }
    )
    async with kit.watcher() as watcher:
        await kit.start()
        entries = await kit.wait_for_journal(lambda e: any(x.event == "hog" for x in e), "allocation")
        hog_pid, grown_at = next((x.pid, x.time) for x in entries if x.event == "hog")
        unhealthy = await watcher.wait_event("instance.unhealthy", hog, 0)
        exited = await watcher.wait_event("instance.exited", hog, 0)
        replacement = await watcher.wait_event(
            "instance.started", hog, 0, where=lambda e: e.data["pid"] != hog_pid
        )
        await watcher.wait_event("instance.running", hog, 0, since=watcher.events.index(replacement))

    assert unhealthy.data["cause"] == "memory"
    assert "max_memory_mb=100" in unhealthy.data["reason"]
    # The sampler runs every grace_s / 2, so the restart comes at most about 2 * grace_s after
    # the allocation. The rest of the bound is margin for a loaded machine.
    assert unhealthy.time - grown_at <= grace_s + 3.5, f"acted after {unhealthy.time - grown_at:.2f} s"
    # Stopped with SIGTERM within stop_timeout_s: the worker drained and exited by itself.
    assert exited.data["exit_code"] == 0
    assert exited.data["cause"] == "memory"
    assert not is_running(hog_pid)
