"""SIGHUP applies a changed supervisor.toml to the services whose settings changed, and to no other."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from supkit import CRASH_MODULE, NORMAL_MODULE, SupKit, is_running, supervisor_kit


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
