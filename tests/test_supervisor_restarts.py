"""The supervisor replaces a killed instance, backs off a crash loop, and gives up on fatal errors.

Most tests run the real `mrq-supervisor start` with services written into their tmp folder
and watch the events it publishes on the control exchange. The restart policy is tested
directly, and the instance task with a node context that fails on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger
from supkit import (
    BROKEN_MODULE,
    CRASH_MODULE,
    NORMAL_MODULE,
    SUPERVISOR,
    SupKit,
    is_running,
    render_config,
    supervisor_kit,
)

from sdk.wire import Hello
from supervisor.config import SupervisorSettings, load_config
from supervisor.instance import Instance
from supervisor.policy import RestartPolicy, RestartTracker, StartSlots, State
from supervisor.process import SpawnSpec


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    with supervisor_kit(tmp_path, broker_url, unique) as kit:
        yield kit


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_killed_instance_replaced_and_ready(kit: SupKit) -> None:
    orders, billing = kit.service("orders"), kit.service("billing")
    kit.write_module("normal", NORMAL_MODULE)
    # A short start timeout: the killed instance has run longer than it, and its
    # replacement must still get the whole start timeout for its first heartbeat.
    start_timeout_s = 5
    kit.write_config(
        {orders: {"module": "normal", "replicas": 2}, billing: {"module": "normal"}},
        start_timeout_s=start_timeout_s,
    )
    async with kit.watcher() as watcher:
        run = await kit.start()
        await run.wait_for_log("supervisor ready")
        started = {e.instance: e.data["pid"] for e in watcher.events_of("instance.started", orders)}
        billing_pid = watcher.events_of("instance.started", billing)[0].data["pid"]

        table = run.stdout()
        for name in (orders, billing, f"{orders}.echo", f"{billing}.echo", "2/2", "1/1"):
            assert name in table, f"{name!r} missing from the start-up table:\n{table}"
        for pid in (*started.values(), billing_pid):
            assert str(pid) in table, f"pid {pid} missing from the start-up table:\n{table}"

        await anyio.sleep(start_timeout_s + 1)
        mark = watcher.mark()
        victim = started[1]
        os.kill(victim, signal.SIGKILL)

        exited = await watcher.wait_event("instance.exited", orders, 1, since=mark)
        assert exited.data["signal"] == signal.SIGKILL
        replacement = await watcher.wait_event("instance.started", orders, 1, since=mark)
        new_pid = replacement.data["pid"]
        assert new_pid != victim
        await watcher.wait_event("instance.running", orders, 1, since=mark, timeout_s=start_timeout_s + 10)

    assert is_running(new_pid)
    assert len(watcher.events_of("instance.started", orders, 1, since=mark)) == 1, watcher.describe()
    assert not watcher.events_of("instance.unhealthy", since=mark), watcher.describe()
    assert [e.data["pid"] for e in watcher.events_of("instance.started", orders, 0)] == [started[0]]
    snapshot = await kit.wait_for_registry(
        lambda s: {i.state for i in s.instances} == {"running"}, "all running"
    )
    record = next(i for i in snapshot.instances if i.service == orders and i.index == 1)
    assert record.pid == new_pid
    assert record.state == "running"


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_crash_loop_backs_off_then_fatal(kit: SupKit) -> None:
    crash = kit.service("crash")
    kit.write_module("crash", CRASH_MODULE)
    max_restarts = 3
    kit.write_config(
        {
            crash: {
                "module": "crash",
                "max_restarts": max_restarts,
                "restart_window_s": 60,
                "backoff_initial_s": 0.3,
                "backoff_max_s": 10,
            }
        }
    )
    async with kit.watcher() as watcher:
        await kit.start()
        fatal = await watcher.wait_event("instance.fatal", crash, 0, timeout_s=40)
        await anyio.sleep(1.5)

    starts = watcher.events_of("instance.started", crash)
    exits = watcher.events_of("instance.exited", crash)
    backoffs = [e.data["backoff_s"] for e in watcher.events_of("instance.restarting", crash)]
    assert len(starts) == max_restarts + 1, watcher.describe()
    assert [e.data["exit_code"] for e in exits] == [3] * (max_restarts + 1)
    assert len(backoffs) == max_restarts, watcher.describe()
    assert backoffs[0] == 0, f"the first restart waits: {backoffs}"
    assert all(later > earlier for earlier, later in itertools.pairwise(backoffs)), backoffs
    assert f"max_restarts={max_restarts}" in fatal.data["reason"]

    snapshot = await kit.wait_for_registry(
        lambda s: [i.state for i in s.instances] == ["fatal"], "state fatal"
    )
    record = snapshot.instances[0]
    assert record.state == "fatal"
    assert record.last_exit_code == 3
    assert [e.kind for e in snapshot.events if e.service == crash][-1] == "instance.fatal"


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_import_error_fatal_without_retry(kit: SupKit) -> None:
    broken = kit.service("broken")
    kit.write_module("broken", BROKEN_MODULE)
    kit.write_config({broken: {"module": "broken", "max_restarts": 5}})
    async with kit.watcher() as watcher:
        run = await kit.start()
        fatal = await watcher.wait_event("instance.fatal", broken, 0)
        # A restart would follow at once, so this wait is long enough to see it.
        await anyio.sleep(2)

    assert len(watcher.events_of("instance.started", broken)) == 1, watcher.describe()
    assert not watcher.events_of("instance.restarting", broken), watcher.describe()
    assert watcher.events_of("instance.exited", broken)[0].data["exit_code"] == 78
    assert "configuration error" in fatal.data["reason"]
    await kit.wait_for_registry(lambda s: [i.state for i in s.instances] == ["fatal"], "state fatal")
    log = (kit.state_dir / "logs" / f"{broken}.0.log").read_text()
    assert "module_that_does_not_exist" in log
    assert run.exit_code() is None, "one fatal service must not stop the supervisor"


def test_backoff_capped_after_many_restarts() -> None:
    tracker = RestartTracker(RestartPolicy(backoff_initial_s=0.5, backoff_max_s=30.0, jitter=0.2))

    delays = []
    for consecutive in (2, 3, 1026, 1027, 100_000):
        tracker.consecutive = consecutive
        delays.append(tracker.next_delay_s())

    assert 0.4 <= delays[0] <= 0.6
    assert 0.8 <= delays[1] <= 1.2
    assert delays[2:] == [30.0, 30.0, 30.0]


class FailingContext:
    """A node context that runs real processes and raises when asked to publish one event kind."""

    def __init__(self, folder: Path, settings: SupervisorSettings, failing_kind: str) -> None:
        self.node = "n1"
        self.settings = settings
        self.broker_connected = True
        self.connected_since_mono = time.monotonic()
        self.reconnected = False
        self.folder = folder
        self.failing_kind = failing_kind
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self.start_slots = StartSlots(4, 2.0)

    def spawn_spec(self, instance: Instance) -> SpawnSpec:
        return SpawnSpec(
            argv=list(instance.config.command or []),
            env={"PATH": os.environ["PATH"]},
            cwd=self.folder,
            stdout_path=self.folder / "instance.log",
            stderr_path=self.folder / "instance.log",
        )

    async def configuration_error(self, instance: Instance) -> str | None:
        return None

    async def event(self, kind: str, instance: Instance, **data: Any) -> None:
        self.events.append((kind, data))
        if kind == self.failing_kind:
            raise RuntimeError(f"cannot publish {kind}")

    def instance_changed(self, instance: Instance) -> None:
        self._changed.set()

    def instance_removed(self, instance: Instance) -> None:
        pass

    def routes_announced(self, service: str, hello: Hello) -> None:
        pass

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_supervision_error_makes_instance_fatal(tmp_path: Path) -> None:
    config_path = tmp_path / "supervisor.toml"
    config_path.write_text(render_config({"dashboard": "off"}, {"crasher": {"command": ["false"]}}))
    config = load_config(config_path)
    context = FailingContext(tmp_path, config.supervisor, "instance.restarting")
    instance = Instance(context, "crasher", 0, config.services["crasher"])
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(str(message)), level="ERROR")
    try:
        async with asyncio.TaskGroup() as tasks:
            task = tasks.create_task(instance.run())
            instance.request_start()
            async with asyncio.timeout(20):
                await context.wait_for(lambda: instance.state == State.FATAL)
            await asyncio.sleep(0.2)
            still_supervised = not task.done()
            task.cancel()
    finally:
        logger.remove(sink)

    assert still_supervised, "the error ended the instance task"
    assert instance.last_exit_reason == "supervision failed: RuntimeError: cannot publish instance.restarting"
    assert instance.process is None
    assert [kind for kind, _data in context.events][-1] == "instance.fatal"
    failures = [line for line in errors if "instance supervision failed service=crasher" in line]
    assert len(failures) == 1, errors
    assert "Traceback" in failures[0]


# Each run counts itself in a file. Runs 1, 2 and 4 exit with 3 at once, run 3 exits
# with 3 after 1.5 s (longer than stable_after_s), and run 5 keeps running.
COUNTED_RUNS_SCRIPT = """
n=$(cat "$1" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > "$1"
if [ "$n" -ge 5 ]; then exec sleep 1000; fi
if [ "$n" -eq 3 ]; then sleep 1.5; fi
exit 3
"""


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stable_run_resets_backoff(kit: SupKit) -> None:
    flaky = kit.service("flaky")
    counter = kit.folder / "runs"
    kit.write_config(
        {
            flaky: {
                "command": ["sh", "-c", COUNTED_RUNS_SCRIPT, "sh", str(counter)],
                "max_restarts": 10,
                "backoff_initial_s": 0.4,
                "stable_after_s": 1.0,
            }
        }
    )
    async with kit.watcher() as watcher:
        await kit.start()
        # The watcher checks after each event, and the fifth run writes its count after
        # its start event, so this counts start events rather than reading the file.
        await watcher.wait_until(
            lambda: len(watcher.events_of("instance.started", flaky, 0)) == 5, "the fifth start", 30
        )

    backoffs = [e.data["backoff_s"] for e in watcher.events_of("instance.restarting", flaky)]
    assert len(backoffs) == 4, watcher.describe()
    assert backoffs[0] == 0, f"the first restart is immediate: {backoffs}"
    assert backoffs[1] > 0, f"the second restart in a row waits: {backoffs}"
    assert backoffs[2] == 0, f"a restart after a stable run is immediate again: {backoffs}"
    assert backoffs[3] > 0, f"the backoff grows again after a short run: {backoffs}"


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_operator_start_clears_fatal(kit: SupKit) -> None:
    broken = kit.service("broken")
    repaired = kit.folder / "repaired"
    script = f'if [ -f "{repaired}" ]; then exec sleep 1000; fi; exit 3'
    kit.write_config({broken: {"command": ["sh", "-c", script], "max_restarts": 1}})
    async with kit.watcher() as watcher:
        await kit.start()
        await watcher.wait_event("instance.fatal", broken, 0)
        await anyio.sleep(1.0)  # a restart after fatal would come at once
        starts_before = len(watcher.events_of("instance.started", broken, 0))

        repaired.touch()
        mark = watcher.mark()
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [SUPERVISOR, "start", broken, "-c", str(kit.config_path)],
                capture_output=True,
                text=True,
                timeout=60,
                env={k: v for k, v in os.environ.items() if not k.startswith("MRQ_")},
                check=False,
            )
        )
        await watcher.wait_event("instance.running", broken, 0, since=mark)

    assert result.returncode == 0, result.stderr
    assert starts_before == 2, watcher.describe()
    started = watcher.events_of("instance.started", broken, 0, mark)
    assert len(started) == 1, watcher.describe()
    assert is_running(started[0].data["pid"])
    snapshot = await kit.wait_for_registry(
        lambda s: [i.state for i in s.instances] == ["running"], "state running"
    )
    assert snapshot.instances[0].pid == started[0].data["pid"]
