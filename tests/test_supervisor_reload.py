"""SIGHUP applies a changed supervisor.toml to the services whose settings changed, and to no other.

A reload, a rolling restart and scaling change one service one after another, so none of
them works on an instance list that another one changed halfway. A rolling restart stops
at the first instance that does not run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from supkit import (
    BROKEN_MODULE,
    CRASH_MODULE,
    NORMAL_MODULE,
    PYTHON,
    SPEW_SCRIPT,
    SupKit,
    find_marked,
    is_running,
    poll_until,
    supervisor_kit,
)
from test_control_kit import run_cli

STUBBORN_COMMAND = ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


def colors_config(kit: SupKit, color: str, scaled_replicas: int) -> dict[str, dict[str, Any]]:
    return {
        kit.service("colors"): {"module": "normal", "replicas": 2, "env": {"SUPTEST_COLOR": color}},
        kit.service("scaled"): {"module": "normal", "replicas": scaled_replicas},
        kit.service("steady"): {"module": "normal"},
    }


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_sighup_touches_changed_services_only(kit: SupKit) -> None:
    colors, scaled, steady = kit.service("colors"), kit.service("scaled"), kit.service("steady")
    kit.write_module("normal", NORMAL_MODULE)
    kit.write_config(colors_config(kit, "red", 1))
    async with kit.watcher() as watcher:
        run = await kit.start()
        await run.wait_for_log("supervisor ready")
        before = {(e.service, e.instance): e.data["pid"] for e in watcher.events_of("instance.started")}
        mark = watcher.mark()
        kit.write_config(colors_config(kit, "blue", 2))
        run.send_signal(signal.SIGHUP)
        reloaded = await watcher.wait_event("config.reloaded", since=mark, timeout_s=40)

    assert reloaded.data["changed"] == [colors]
    assert reloaded.data["scaled"] == {scaled: 2}
    changed = watcher.events[mark:]

    # colors: both instances restarted with the new env, one after the other.
    for index in (0, 1):
        starts = [
            e for e in changed if e.kind == "instance.started" and (e.service, e.instance) == (colors, index)
        ]
        assert len(starts) == 1, watcher.describe()
        pid = starts[0].data["pid"]
        assert pid != before[colors, index]
        assert psutil.Process(pid).environ()["SUPTEST_COLOR"] == "blue"
        assert not is_running(before[colors, index])
    order = [
        (e.kind, e.instance)
        for e in changed
        if e.service == colors and e.kind in ("instance.exited", "instance.running")
    ]
    assert order == [
        ("instance.exited", 0),
        ("instance.running", 0),
        ("instance.exited", 1),
        ("instance.running", 1),
    ], "the restart was not rolling"
    assert all(e.data["cause"] == "restart" for e in changed if e.kind == "instance.exited")

    # scaled: instance 0 untouched, instance 1 added.
    assert [(e.kind, e.instance) for e in changed if e.service == scaled] == [
        ("instance.started", 1),
        ("instance.running", 1),
    ]
    assert is_running(before[scaled, 0])

    # steady: nothing happened to it.
    assert [e for e in changed if e.service == steady] == []
    assert is_running(before[steady, 0])

    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    assert len([i for i in snapshot.instances if i.service == scaled]) == 2
    assert {i.state for i in snapshot.instances} == {"running"}


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_reload_restarts_repaired_fatal_service(kit: SupKit) -> None:
    crashy = kit.service("crashy")
    kit.write_module("crashy", CRASH_MODULE)
    kit.write_config({crashy: {"module": "crashy", "max_restarts": 0}})
    async with kit.watcher() as watcher:
        run = await kit.start()
        await watcher.wait_event("instance.fatal", crashy, 0)
        await kit.wait_for_registry(lambda s: [i.state for i in s.instances] == ["fatal"], "state fatal")

        # NOTE: a fixed module alone is no configuration change, so SIGHUP would not restart
        # the fatal service. The changed env makes it one.
        kit.write_module("crashy", NORMAL_MODULE)
        kit.write_config({crashy: {"module": "crashy", "max_restarts": 0, "env": {"SUPTEST_FIXED": "1"}}})
        mark = watcher.mark()
        run.send_signal(signal.SIGHUP)
        await watcher.wait_event("instance.running", crashy, 0, since=mark)
        await watcher.wait_event("config.reloaded", since=mark)

    assert len(watcher.events_of("instance.started", crashy, since=mark)) == 1
    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    assert is_running(snapshot.instances[0].pid or 0)


async def cli(kit: SupKit, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: run_cli(kit.config_path, *args))


async def status_of(kit: SupKit, service: str) -> list[dict[str, Any]]:
    result = await cli(kit, "status", service, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    return [row for node in document["nodes"].values() for row in node["instances"]]


def instance_processes(kit: SupKit, service: str) -> set[int]:
    """Return the pids of the running instance processes of `service`: the group leaders with its name."""
    found = set()
    for process in find_marked(kit.state_dir):
        try:
            if (
                os.getpgid(process.pid) == process.pid
                and process.environ().get("MRQ_SERVICE_NAME") == service
            ):
                found.add(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_sighup_with_unloadable_file_keeps_running(kit: SupKit) -> None:
    sleeper = kit.service("sleeper")
    kit.write_config({sleeper: {"command": ["sleep", "100000"]}})
    async with kit.watcher() as watcher:
        run = await kit.start()
        await run.wait_for_log("supervisor ready")
        pid = watcher.events_of("instance.started", sleeper, 0)[0].data["pid"]
        broken = {"module": "m", "python": "~nosuchuser/bin/python"}
        kit.write_config({sleeper: {"command": ["sleep", "100000"]}, "other": broken})
        mark = watcher.mark()
        run.send_signal(signal.SIGHUP)
        failed = await watcher.wait_event("config.reload_failed", since=mark)
        await anyio.sleep(1.0)

    assert run.exit_code() is None, run.stderr()[-4000:]
    assert "services.other.python" in failed.data["error"]
    assert "Could not determine home directory" in failed.data["error"]
    assert is_running(pid)
    assert "Traceback" not in run.stderr()


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_reload_stops_rolling_restart_at_broken_instance(kit: SupKit) -> None:
    echo = kit.service("echo")
    kit.write_module("normal", NORMAL_MODULE)
    kit.write_module("broken", BROKEN_MODULE)
    kit.write_config({echo: {"module": "normal", "replicas": 3}})
    run = await kit.start()
    await run.wait_for_log("supervisor ready")
    before = {row["instance"]: row["pid"] for row in await status_of(kit, echo)}

    kit.write_config({echo: {"module": "broken", "replicas": 3}})
    result = await cli(kit, "reload")
    rows = {row["instance"]: row for row in await status_of(kit, echo)}

    assert result.returncode == 1
    assert f"rolling restart of {echo} stopped at {echo}:0: fatal after the restart" in result.stderr
    assert "configuration error" in result.stderr
    assert f"{echo}:1, {echo}:2 kept running with the earlier process" in result.stderr
    assert rows[0]["state"] == "fatal"
    assert [(rows[i]["state"], rows[i]["pid"]) for i in (1, 2)] == [
        ("running", before[1]),
        ("running", before[2]),
    ]
    assert run.exit_code() is None


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_overlapping_scales_leave_no_hidden_instance(kit: SupKit) -> None:
    stubborn = kit.service("stubborn")
    kit.write_config({stubborn: {"command": STUBBORN_COMMAND, "replicas": 3, "stop_timeout_s": 3}})
    run = await kit.start(reaper=True)
    await run.wait_for_log("supervisor ready")

    async with anyio.create_task_group() as tasks:
        results: list[subprocess.CompletedProcess[str]] = []

        async def scale(replicas: int) -> None:
            results.append(await cli(kit, "scale", stubborn, str(replicas)))

        tasks.start_soon(scale, 1)
        # The first scale waits about stop_timeout_s for the stubborn instances.
        await anyio.sleep(1.0)
        tasks.start_soon(scale, 4)

    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    # The second scale waited for the first one, so it started from 1 instance.
    assert sorted(r.stdout.split(": ", 1)[1].strip() for r in results) == [
        "1 -> 4 instances",
        "3 -> 1 instances",
    ]
    rows = await status_of(kit, stubborn)
    with anyio.fail_after(30):
        while {row["state"] for row in rows} != {"running"}:
            # The status comes from another process, which sends no notification.
            await anyio.sleep(0.2)
            rows = await status_of(kit, stubborn)
    assert sorted(row["instance"] for row in rows) == [0, 1, 2, 3]
    assert await poll_until(lambda: instance_processes(kit, stubborn) == {row["pid"] for row in rows}, 5)

    run.send_signal(signal.SIGTERM)
    assert await run.wait_exit(timeout_s=40) == 0
    assert instance_processes(kit, stubborn) == set()


# Writes about 200 kB a second to stdout.
SPEW_COMMAND = [PYTHON, "-c", SPEW_SCRIPT, "20"]


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_reload_applies_log_settings_and_lists_the_rest(kit: SupKit) -> None:
    spew = kit.service("spew")
    services = {spew: {"command": SPEW_COMMAND}}
    kit.write_config(services, log_max_bytes=100_000_000, log_backups=0)
    log_path = kit.state_dir / "logs" / f"{spew}.0.log"
    async with kit.watcher() as watcher:
        run = await kit.start()
        await run.wait_for_log("supervisor ready")
        mark = watcher.mark()
        kit.write_config(
            services, log_max_bytes=300_000, log_backups=1, heartbeat_misses=5, start_timeout_s=20
        )
        run.send_signal(signal.SIGHUP)
        reloaded = await watcher.wait_event("config.reloaded", since=mark)
        rotated = await poll_until(log_path.with_name(log_path.name + ".1").exists, 20)

    assert reloaded.data["settings"] == ["log_max_bytes", "log_backups"]
    assert reloaded.data["ignored"] == ["heartbeat_misses", "start_timeout_s"]
    assert rotated, "no rotation with the new log_max_bytes"
    assert watcher.events_of("instance.exited", since=mark) == []
    assert "reload ignores settings that need a supervisor restart keys=heartbeat_misses,start_timeout_s" in (
        run.stderr()
    )
