"""A broker outage is not mistaken for dead instances: nothing is restarted, nothing turns fatal.

The test stops a private RabbitMQ node of its own for 20 s. The shared broker on
127.0.0.1:5672 is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from supkit import NORMAL_MODULE, is_running, supervisor_kit

from supervisor.broker import PrivateBroker
from supervisor.instance import RECONNECT_GRACE_S

OUTAGE_S = 20.0
HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_MISSES = 3
NODE_START_TIMEOUT_S = 90.0
NODE_STOP_TIMEOUT_S = 30.0


@pytest.mark.private_broker
@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_broker_outage_restarts_nothing(tmp_path: Path, unique: str) -> None:
    broker = PrivateBroker(tmp_path / "rabbit")
    await broker.start(NODE_START_TIMEOUT_S)
    try:
        with supervisor_kit(tmp_path, broker.url, unique) as kit:
            orders, script = kit.service("orders"), kit.service("script")
            kit.write_module("normal", NORMAL_MODULE)
            kit.write_config(
                {
                    orders: {"module": "normal", "replicas": 2},
                    script: {"command": ["sh", "-c", "while true; do sleep 0.1; done"]},
                },
                heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
                heartbeat_misses=HEARTBEAT_MISSES,
            )
            async with kit.watcher() as watcher:
                run = await kit.start(reaper=True)
                await run.wait_for_log("supervisor ready")
                pids = {(e.service, e.instance): e.data["pid"] for e in watcher.events_of("instance.started")}
                worker_pids = {pid for (service, _), pid in pids.items() if service == orders}
                await watcher.wait_until(lambda: watcher.heartbeat_pids(orders) == worker_pids, "heartbeats")

            outage_began = time.time()
            await broker.stop(NODE_STOP_TIMEOUT_S)
            await run.wait_for_log("broker disconnected")
            await anyio.sleep(OUTAGE_S)
            await broker.start(NODE_START_TIMEOUT_S)
            back_at = time.monotonic()

            async with kit.watcher() as watcher:
                await watcher.wait_until(
                    lambda: watcher.heartbeat_pids(orders) == worker_pids, "heartbeats after the outage", 40
                )
                await run.wait_for_log("broker connected")
                # The supervisor judges heartbeats again this long after it reconnects.
                judged_from = back_at + HEARTBEAT_INTERVAL_S * HEARTBEAT_MISSES + RECONNECT_GRACE_S
                await anyio.sleep(max(0.0, judged_from + 3 - time.monotonic()))
                assert watcher.heartbeat_pids(orders, since_mono=judged_from) == worker_pids

            snapshot = await kit.wait_for_registry(
                lambda s: {i.state for i in s.instances} == {"running"}, "all running"
            )
            running_after = {pid: is_running(pid) for pid in pids.values()}
    finally:
        await broker.stop(NODE_STOP_TIMEOUT_S)

    since_outage = [e for e in snapshot.events if e.time >= outage_began and e.service is not None]
    troubles = [e for e in since_outage if e.kind.startswith("instance.")]
    assert troubles == [], f"instances were touched during or after the outage: {troubles}"
    assert {(i.service, i.index): i.pid for i in snapshot.instances} == pids
    assert {i.state for i in snapshot.instances} == {"running"}
    assert all(i.restarts == 0 for i in snapshot.instances)
    assert running_after == dict.fromkeys(pids.values(), True)
