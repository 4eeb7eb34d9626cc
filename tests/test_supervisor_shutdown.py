"""SIGTERM stops every instance at once, lets their handlers finish, and leaves no process behind.

A second SIGTERM ends the wait: the supervisor kills what is left at once. An instance that
even SIGKILL does not end makes the supervisor exit with code 1 and name its pid.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import anyio
import pytest
from supkit import WORK_MODULE, SupKit, is_running, poll_until, process_status, supervisor_kit

from sdk import Client


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


def drain_times(log: str) -> list[float]:
    """Return the times of the worker's "draining" lines in an instance log."""
    return [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        for line in log.splitlines()
        if "draining reason=signal SIGTERM" in line
    ]


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_sigterm_drains_all_in_parallel(kit: SupKit) -> None:
    work = kit.service("work")
    replicas, handler_s = 3, 3.0
    kit.write_module("work", WORK_MODULE)
    kit.write_config({work: {"module": "work", "replicas": replicas, "stop_timeout_s": 15}})
    # Started without the subreaper: an instance the supervisor did not reap would stay a zombie.
    run = await kit.start()
    await run.wait_for_log("supervisor ready")
    async with Client(broker_url=kit.broker_url, exchange=kit.exchange) as sender:
        for _ in range(2 * replicas):
            await sender.send(f"{work}.slow", handler_s)
    entries = await kit.wait_for_journal(
        lambda e: len({x.pid for x in e if x.event == "start"}) == replicas, "a handler in every instance"
    )
    pids = {x.pid for x in entries if x.event == "start"}

    run.send_signal(signal.SIGTERM)
    code = await run.wait_exit(timeout_s=30)
    took_s = time.monotonic() - run.signalled_at["SIGTERM"]

    assert code == 0
    entries = kit.journal_entries()
    assert len([x for x in entries if x.event == "start"]) == len([x for x in entries if x.event == "done"])
    assert {x.pid for x in entries if x.event == "done"} == pids
    assert took_s < handler_s + 6, f"stopping took {took_s:.1f} s"
    starts = [
        drain_times((kit.state_dir / "logs" / f"{work}.{index}.log").read_text())[0]
        for index in range(replicas)
    ]
    assert max(starts) - min(starts) < 1.5, f"instances were stopped one after another: {starts}"
    for pid in pids:
        assert process_status(pid) is None, f"instance pid {pid} remains: {process_status(pid)}"
    assert await kit.marked_processes() == []
    assert "supervisor stopped" in run.stderr()


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_second_sigterm_kills_at_once(kit: SupKit) -> None:
    stubborn = kit.service("stubborn")
    stop_timeout_s = 30
    kit.write_config(
        {
            stubborn: {
                "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
                "stop_timeout_s": stop_timeout_s,
            }
        }
    )
    async with kit.watcher() as watcher:
        run = await kit.start(reaper=True)
        await run.wait_for_log("supervisor ready")
        pid = watcher.events_of("instance.started", stubborn, 0)[0].data["pid"]
        run.send_signal(signal.SIGTERM)
        await run.wait_for_log("stopping all instances")
        await watcher.wait_event("node.stopping")
        await anyio.sleep(1.0)
        assert run.exit_code() is None
        assert is_running(pid), "the program was expected to ignore SIGTERM"

        run.send_signal(signal.SIGTERM)
        code = await run.wait_exit(timeout_s=stop_timeout_s)
        took_s = time.monotonic() - run.signalled_at["SIGTERM"]
        exited = await watcher.wait_event("instance.exited", stubborn, 0)

    assert code == 0
    assert took_s < 10, f"the supervisor waited {took_s:.1f} s after the second signal"
    assert "second signal, killing instances now" in run.stderr()
    assert exited.data["signal"] == signal.SIGKILL
    assert not is_running(pid)
    assert await kit.marked_processes() == []


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_sigterm_during_startup_stops_at_once(kit: SupKit) -> None:
    silent = kit.service("silent")
    start_timeout_s = 40
    # Expects heartbeats that never come, so start-up waits for start_timeout_s.
    kit.write_config(
        {silent: {"command": ["sleep", "300"], "heartbeat": True}}, start_timeout_s=start_timeout_s
    )
    async with kit.watcher() as watcher:
        run = await kit.start()
        pid = (await watcher.wait_event("instance.started", silent, 0)).data["pid"]
        await run.wait_for_log(f"instance started service={silent}")
        await anyio.sleep(0.5)
        run.send_signal(signal.SIGTERM)
        code = await run.wait_exit(timeout_s=start_timeout_s)
        took_s = time.monotonic() - run.signalled_at["SIGTERM"]

    assert code == 0
    assert took_s < 10, f"the supervisor finished its start-up wait first: {took_s:.1f} s"
    assert process_status(pid) is None
    assert await kit.marked_processes() == []


FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")


@contextmanager
def frozen(pid: int, name: str) -> Iterator[None]:
    """Freeze `pid` in a cgroup v1 freezer of its own: a frozen process does not act on SIGKILL.

    On leaving, the process is thawed, so a SIGKILL sent meanwhile ends it then.
    """
    group = FREEZER_ROOT / name
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (group / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline, "the freezer did not freeze the process"
            time.sleep(0.05)
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        for leftover in (group / "cgroup.procs").read_text().split():
            (FREEZER_ROOT / "cgroup.procs").write_text(leftover)
        group.rmdir()


@pytest.mark.anyio
@pytest.mark.timeout(90)
@pytest.mark.skipif(
    not os.access(FREEZER_ROOT, os.W_OK),
    reason="needs a writable cgroup v1 freezer at /sys/fs/cgroup/freezer",
)
async def test_instance_surviving_sigkill_fails_shutdown(kit: SupKit) -> None:
    sleeper = kit.service("sleeper")
    kit.write_config({sleeper: {"command": ["sleep", "300"], "stop_timeout_s": 1}})
    async with kit.watcher() as watcher:
        run = await kit.start(reaper=True)
        await run.wait_for_log("supervisor ready")
        pid = watcher.events_of("instance.started", sleeper, 0)[0].data["pid"]

    with frozen(pid, f"mrq-test-{kit.unique}"):
        run.send_signal(signal.SIGTERM)
        # stop_timeout_s, 5 s after SIGKILL, then the node's 10 s grace after its own SIGKILL.
        code = await run.wait_exit(timeout_s=60)
        still_there = is_running(pid)

    assert code == 1
    assert still_there
    stderr = run.stderr()
    assert "Traceback" not in stderr
    survivors = [line for line in stderr.splitlines() if "instances still running after SIGKILL" in line]
    assert len(survivors) == 1, stderr[-4000:]
    assert f"instances={sleeper}:0 pids={pid};" in survivors[0]
    assert f"instance stop failed service={sleeper} instance=0 pid={pid}" in stderr
    # Thawed, it acts on the pending SIGKILL.
    assert await poll_until(lambda: not is_running(pid), 10)
