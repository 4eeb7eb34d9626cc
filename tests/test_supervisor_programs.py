"""A program in another language, without heartbeats, is supervised by its process state alone."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from supkit import PYTHON, SPEW_SCRIPT, SupKit, is_running, supervisor_kit


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_killed_program_restarted(kit: SupKit) -> None:
    looper = kit.service("looper")
    kit.write_config({looper: {"command": ["sh", "-c", "while true; do sleep 0.1; done"]}})
    async with kit.watcher() as watcher:
        # The subreaper reaps the `sleep` that the killed shell leaves behind.
        run = await kit.start(reaper=True)
        await run.wait_for_log("supervisor ready")
        first = (await watcher.wait_event("instance.started", looper, 0)).data["pid"]
        # A program has no heartbeat: it is ready as soon as it runs.
        await watcher.wait_event("instance.running", looper, 0)
        mark = watcher.mark()
        os.kill(first, signal.SIGKILL)
        exited = await watcher.wait_event("instance.exited", looper, 0, since=mark)
        started = await watcher.wait_event("instance.started", looper, 0, since=mark)
        await watcher.wait_event("instance.running", looper, 0, since=mark)

    assert exited.data["signal"] == signal.SIGKILL
    assert started.data["pid"] != first
    assert is_running(started.data["pid"])
    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    assert [(i.pid, i.state) for i in snapshot.instances] == [(started.data["pid"], "running")]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_program_exit_zero_not_restarted_on_failure(kit: SupKit) -> None:
    oneshot = kit.service("oneshot")
    kit.write_config(
        {oneshot: {"command": ["sh", "-c", "sleep 0.5; echo finished; exit 0"], "restart": "on-failure"}}
    )
    async with kit.watcher() as watcher:
        run = await kit.start()
        exited = await watcher.wait_event("instance.exited", oneshot, 0)
        # A restart would follow at once, so this wait is long enough to see it.
        await anyio.sleep(2)

    assert exited.data["exit_code"] == 0
    assert exited.data["cause"] == "exit"
    assert len(watcher.events_of("instance.started", oneshot)) == 1, watcher.describe()
    assert not watcher.events_of("instance.restarting", oneshot), watcher.describe()
    snapshot = await kit.wait_for_registry(
        lambda s: [i.state for i in s.instances] == ["exited"], "state exited"
    )
    record = snapshot.instances[0]
    assert record.state == "exited"
    assert record.pid is None
    assert record.last_exit_code == 0
    assert "finished" in (kit.state_dir / "logs" / f"{oneshot}.0.log").read_text()
    assert run.exit_code() is None


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_fast_log_rotated_within_seconds(kit: SupKit) -> None:
    spew = kit.service("spew")
    # About 1 MB a second.
    kit.write_config(
        {spew: {"command": [PYTHON, "-c", SPEW_SCRIPT, "100"]}}, log_max_bytes=200_000, log_backups=0
    )
    log_path = kit.state_dir / "logs" / f"{spew}.0.log"
    run = await kit.start()
    await run.wait_for_log("supervisor ready")

    sizes = []
    began = time.monotonic()
    while time.monotonic() - began < 6:
        sizes.append(log_path.stat().st_size if log_path.exists() else 0)
        await anyio.sleep(0.05)

    # A check every 10 s would let the file grow to about 6 MB here. A check every second
    # keeps it near 1.2 MB, or somewhat more while the machine is loaded.
    assert max(sizes) < 3_000_000, f"the log grew to {max(sizes)} bytes"
    drops = sum(1 for earlier, later in itertools.pairwise(sizes) if later < earlier)
    assert drops >= 3, f"the log was rotated {drops} times in 6 s"
    assert "log rotated" in run.stderr()
