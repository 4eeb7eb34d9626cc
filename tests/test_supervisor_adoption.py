"""A supervisor killed with SIGKILL and started again takes over the instances it left running.

The first supervisor runs under a child subreaper (see supkit.REAPER_SCRIPT), which reaps
the instances once they are orphaned. Instances log into files the supervisor opened for
them, so their output goes on while no supervisor runs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest
from supkit import NORMAL_MODULE, TICKER_MODULE, SupKit, is_running, poll_until, supervisor_kit

from supervisor.registry import InstanceRecord, Registry, ServiceRecord, registry_path

# Adopted instances send heartbeats every 0.2 s, so this bound leaves room for a loaded machine.
ADOPTION_READY_S = 4.0


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


def last_tick(log: str) -> int:
    ticks = [int(line.split()[1]) for line in log.splitlines() if line.startswith("tick ")]
    return ticks[-1] if ticks else 0


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_restarted_supervisor_adopts_instances(kit: SupKit) -> None:
    orders, script = kit.service("orders"), kit.service("script")
    kit.write_module("normal", NORMAL_MODULE)
    kit.write_config(
        {
            orders: {"module": "normal", "replicas": 2},
            script: {"command": ["sh", "-c", "while true; do sleep 0.1; done"]},
        }
    )
    async with kit.watcher() as watcher:
        first = await kit.start(reaper=True)
        await first.wait_for_log("supervisor ready")
        pids = {(e.service, e.instance): e.data["pid"] for e in watcher.events_of("instance.started")}
        assert len(pids) == 3, watcher.describe()
        first.send_signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL
        for pid in pids.values():
            assert is_running(pid), f"instance pid {pid} did not outlive the supervisor"

        mark = watcher.mark()
        second = await kit.start()
        await second.wait_for_log("supervisor ready")
        node_started = await watcher.wait_event("node.started", since=mark)
        for index in (0, 1):
            await watcher.wait_event("instance.running", orders, index, since=mark)
        await watcher.wait_event("instance.running", script, 0, since=mark)

    running = watcher.events_of("instance.running", since=mark)
    assert max(e.time for e in running) - node_started.time <= ADOPTION_READY_S, watcher.describe()
    assert not watcher.events_of("instance.started", since=mark), "an instance was spawned again"
    assert not watcher.events_of("instance.exited", since=mark), watcher.describe()
    marked = await kit.marked_processes()
    leaders = sorted(p.pid for p in marked if os.getpgid(p.pid) == p.pid)
    assert leaders == sorted(pids.values())
    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    assert {(i.service, i.index): i.pid for i in snapshot.instances} == pids
    assert {i.state for i in snapshot.instances} == {"running"}
    routes = {s.name: [r.queue for r in s.routes] for s in snapshot.services}
    assert routes[orders] == [f"{orders}.echo"], "the routes of adopted workers were lost"

    stdout = second.stdout()
    known = stdout.find("Known services (from the registry")
    assert 0 <= known < stdout.find("starting instances"), stdout
    known_table, final_table = (
        stdout[: stdout.find("starting instances")],
        stdout[stdout.find("Services on") :],
    )
    for name, pid in [(orders, pids[orders, 0]), (orders, pids[orders, 1]), (script, pids[script, 0])]:
        assert name in known_table
        assert str(pid) in known_table
        assert str(pid) in final_table
    assert f"{orders}.echo" in final_table, final_table


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_record_with_reused_pid_left_alone(kit: SupKit) -> None:
    orders = kit.service("orders")
    kit.write_module("normal", NORMAL_MODULE)
    start_timeout_s = 5
    kit.write_config({orders: {"module": "normal"}}, start_timeout_s=start_timeout_s)
    stranger = await anyio.to_thread.run_sync(kit.start_stranger, ["sleep", "300"])
    real_start = psutil.Process(stranger.pid).create_time()
    # The registry names the stranger's pid with another start time, as after a pid reuse.
    async with Registry(registry_path(kit.state_dir)) as registry:
        await registry.upsert_service(
            ServiceRecord(orders, "python", "normal", "-", replicas=1, routes=[], updated_at=time.time())
        )
        await registry.put_instance(
            InstanceRecord(orders, 0, pid=stranger.pid, start_time=real_start - 1000, state="running")
        )

    async with kit.watcher() as watcher:
        run = await kit.start()
        await run.wait_for_log("supervisor ready")
        started = await watcher.wait_event("instance.started", orders, 0)
        await watcher.wait_event("instance.running", orders, 0)
        # An adopted process without heartbeats would be stopped after start_timeout_s.
        await anyio.sleep(start_timeout_s + 2)

    assert started.data["pid"] != stranger.pid
    assert stranger.poll() is None, "the process behind the stale record was signalled"
    assert is_running(stranger.pid)
    assert len(watcher.events_of("instance.started", orders)) == 1, watcher.describe()
    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    assert [(i.pid, i.state) for i in snapshot.instances] == [(started.data["pid"], "running")]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_instance_log_survives_supervisor_kill(kit: SupKit) -> None:
    ticker = kit.service("ticker")
    kit.write_module("ticker", TICKER_MODULE)
    kit.write_config({ticker: {"module": "ticker"}})
    log_path = kit.state_dir / "logs" / f"{ticker}.0.log"
    async with kit.watcher() as watcher:
        run = await kit.start(reaper=True)
        await watcher.wait_event("instance.running", ticker, 0)
        pid = watcher.events_of("instance.started", ticker, 0)[0].data["pid"]

    log = log_path.read_text()
    assert f"ticker stdout pid={pid}" in log
    assert f"ticker stderr pid={pid}" in log
    assert f"serving services={ticker}" in log, "the worker's own log lines are missing"
    run.send_signal(signal.SIGKILL)
    await run.wait_exit()
    ticks_at_kill = last_tick(log_path.read_text())
    await anyio.sleep(1.5)

    assert is_running(pid)
    assert last_tick(log_path.read_text()) >= ticks_at_kill + 5


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_session_helper_follows_adopted_instance(kit: SupKit) -> None:
    host = kit.service("host")
    # The helper gets a session of its own, so it is no member of the instance's group.
    kit.write_config({host: {"command": ["bash", "-c", "setsid sleep 99998 & exec sleep 99999"]}})
    async with kit.watcher() as watcher:
        first = await kit.start(reaper=True)
        await first.wait_for_log("supervisor ready")
        pid = watcher.events_of("instance.started", host, 0)[0].data["pid"]
        helpers: list[psutil.Process] = []

        def helper_started() -> bool:
            helpers[:] = [p for p in psutil.Process(pid).children() if p.cmdline() == ["sleep", "99998"]]
            return bool(helpers) and os.getsid(helpers[0].pid) == helpers[0].pid

        assert await poll_until(helper_started, 10), "no helper in a session of its own"
        helper = helpers[0].pid
        first.send_signal(signal.SIGKILL)
        assert await first.wait_exit() == -signal.SIGKILL

        second = await kit.start()
        await second.wait_for_log("supervisor ready")
        # A helper taken for an orphan would get SIGTERM now; give that time to show.
        await anyio.sleep(1.0)

        assert "stopping leftover process" not in second.stderr()
        assert is_running(helper)
        assert is_running(pid)
        kept = await second.wait_for_log("helper of an adopted instance kept")
        assert f"pid={helper} instance_pid={pid}" in kept
        second.send_signal(signal.SIGTERM)
        assert await second.wait_exit(timeout_s=30) == 0

    assert await poll_until(lambda: not is_running(helper), 10), "the helper outlived its instance"
    assert await kit.marked_processes() == []
