"""Tests of `python -m worker` as a real process: start-up, heartbeats, signals, exit codes, logs.

Each test starts workers on the session's virtual host with an exchange of
its own and watches them through a plain consumer of the control exchange.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from signal import SIGKILL, SIGTERM

import anyio
import orjson
import psutil
import pytest
from workerkit import (
    PYTHON,
    ControlObserver,
    JournalEntry,
    WorkerKit,
    close_broker_connections,
    worker_kit,
)

from sdk import Client, __version__, names
from sdk.wire import Goodbye, Heartbeat, Hello

pytestmark = pytest.mark.anyio

# A reserved route name, which the SDK rejects while the module is imported.
MISDEFINED_MODULE = """
from sdk import microservice


@microservice("_hidden")
async def handle(body):
    return body
"""

RAISING_ON_START_MODULE = """
import os

from sdk import Service, route


class Failing(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    async def on_start(self):
        raise RuntimeError("on_start failed on purpose")

    @route("echo")
    async def echo(self, body):
        return body
"""


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[WorkerKit]:
    with worker_kit(tmp_path, broker_url, unique) as started:
        yield started


def observe(kit: WorkerKit) -> ControlObserver:
    return ControlObserver(kit.broker_url, kit.exchange, kit.cluster_key)


def client(kit: WorkerKit) -> Client:
    return Client(kit.broker_url, exchange=kit.exchange, rpc_timeout_s=15, publish_timeout_s=15)


def entries_of(entries: list[JournalEntry], event: str, pid: int) -> set[str]:
    return {entry.body for entry in entries if entry.event == event and entry.pid == pid}


def closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Start-up.


@pytest.mark.timeout(60)
async def test_start_announces_hello_then_heartbeat(kit: WorkerKit) -> None:
    async with observe(kit) as observer:
        worker = kit.start()
        hello = await observer.wait_for(Hello, pid=worker.pid)
        heartbeat = await observer.wait_for(Heartbeat, pid=worker.pid)
        ready = await worker.wait_for_log("ready startup_ms=")
        create_time = psutil.Process(worker.pid).create_time()

    assert (hello.service, hello.instance, hello.node) == (kit.service, 0, kit.node)
    assert abs(hello.started_at - create_time) <= 0.05
    assert hello.sdk_version == __version__
    assert hello.heartbeat_interval_s == 0.2
    queues = {(route.route, route.queue) for route in hello.routes}
    assert queues == {(name, f"{kit.service}.{name}") for name in ("echo", "work", "block")}
    keys = [record.routing_key for record in observer.received if record.message.pid == worker.pid]
    assert keys[0] == names.hello_key(kit.node, kit.service, 0)
    assert keys[1] == names.heartbeat_key(kit.node, kit.service, 0)
    assert heartbeat.seq == 1
    assert heartbeat.started_at == hello.started_at
    startup = re.search(r"ready startup_ms=(\d+)", ready)
    assert startup is not None, ready
    assert 0 < int(startup.group(1)) < 30_000


# Heartbeats.


@pytest.mark.timeout(60)
async def test_heartbeats_keep_interval_and_counts(kit: WorkerKit) -> None:
    async with observe(kit) as observer, client(kit) as sender:
        worker = kit.start()
        await observer.wait_for(Heartbeat, pid=worker.pid)
        window_start = time.monotonic()
        await anyio.sleep(3.0)
        in_window = observer.of_type(Heartbeat, worker.pid, since=window_start)
        quiet = observer.of_type(Heartbeat, worker.pid)

        for number in range(5):
            assert await sender.call(f"{kit.service}.echo", number) == number
        busy = await observer.wait_for(Heartbeat, lambda beat: beat.processed >= 5, pid=worker.pid)

    assert len(in_window) >= 8
    assert [beat.seq for beat in quiet] == list(range(1, len(quiet) + 1))
    mean_gap_s = (quiet[-1].sent_at - quiet[0].sent_at) / (len(quiet) - 1)
    assert 0.15 <= mean_gap_s <= 0.4
    assert {(beat.in_flight, beat.processed, beat.failed) for beat in quiet} == {(0, 0, 0)}
    assert all(10 * 2**20 < beat.rss_bytes < 2 * 2**30 for beat in quiet)
    assert busy.processed == 5
    assert busy.failed == 0
    assert busy.seq > quiet[-1].seq


@pytest.mark.timeout(60)
async def test_blocking_handler_raises_loop_lag(kit: WorkerKit) -> None:
    async with observe(kit) as observer, client(kit) as sender:
        worker = kit.start()
        await observer.wait_for(Heartbeat, pid=worker.pid)
        await sender.send(f"{kit.service}.block", 0.6)
        lagged = await observer.wait_for(Heartbeat, lambda beat: beat.loop_lag_ms >= 400, pid=worker.pid)

    assert lagged.loop_lag_ms < 10_000


@pytest.mark.timeout(60)
async def test_heartbeats_stop_while_loop_blocked(kit: WorkerKit) -> None:
    async with observe(kit) as observer, client(kit) as sender:
        worker = kit.start()
        await observer.wait_for(Heartbeat, pid=worker.pid)
        await sender.send(f"{kit.service}.block", 3600)
        await kit.wait_for_journal(lambda entries: bool(entries_of(entries, "block", worker.pid)), "block")
        # The handler wrote its journal line just before it blocked the loop. The file time
        # comes from the kernel's coarse clock, which may run a few milliseconds behind.
        blocked_at = kit.journal.stat().st_mtime + 0.05
        await anyio.sleep(2.0)  # 10 heartbeat intervals

        late = [beat for beat in observer.of_type(Heartbeat, worker.pid) if beat.sent_at > blocked_at]
        assert late == []
        assert worker.alive()


@pytest.mark.timeout(60)
async def test_heartbeats_expire_in_broker(kit: WorkerKit) -> None:
    async with observe(kit) as observer:
        worker = kit.start()
        await observer.wait_for(Heartbeat, pid=worker.pid)
        idle = await observer.bind_idle_queue(names.heartbeat_key(kit.node, kit.service, 0))
        ready_counts = []
        for _ in range(3):
            await anyio.sleep(1.0)  # five intervals, 1.7 times the 0.6 s time to live
            ready, _consumers = await observer.queue_counts(idle)
            ready_counts.append(ready)
        waiting = await observer.get_one(idle)
        last = observer.records(Heartbeat, worker.pid)[-1]

    # Without expiry the queue would hold about 5, 10 and 15 heartbeats.
    assert max(ready_counts) <= 6, ready_counts
    assert last.expiration_s == pytest.approx(0.6)
    assert waiting is not None, "no heartbeat reached the idle queue"
    assert waiting.routing_key == names.heartbeat_key(kit.node, kit.service, 0)


# Stopping.


@pytest.mark.timeout(60)
async def test_sigterm_lets_handler_in_flight_finish(kit: WorkerKit) -> None:
    queue = f"{kit.service}.work"
    async with observe(kit) as observer, client(kit) as sender:
        worker = kit.start(WORKER_TEST_WORK_S="1", MRQ_STOP_TIMEOUT_S="10")
        await observer.wait_for(Heartbeat, pid=worker.pid)
        await sender.send(queue, 7)
        await kit.wait_for_journal(lambda entries: "7" in entries_of(entries, "start", worker.pid), "start")
        busy = await observer.wait_for(Heartbeat, lambda beat: beat.in_flight == 1, pid=worker.pid)

        signalled_at = time.monotonic()
        worker.send_signal(SIGTERM)
        exit_code = await worker.wait_exit()
        stop_s = time.monotonic() - signalled_at
        goodbye = await observer.wait_for(Goodbye, pid=worker.pid)
        ready, consumers = await observer.queue_counts(queue)
        redelivered = await observer.consume_for(queue, 1.5)

    assert busy.processed == 0
    assert exit_code == 0
    assert stop_s < 10
    assert [(entry.event, entry.body) for entry in kit.journal_entries()] == [("start", "7"), ("done", "7")]
    assert (ready, consumers) == (0, 0)
    assert redelivered == []
    assert goodbye.reason == "signal SIGTERM"
    assert "broker connection lost" not in worker.stderr_text()


@pytest.mark.timeout(60)
async def test_sigterm_cancels_handler_at_stop_deadline(kit: WorkerKit) -> None:
    async with observe(kit) as observer, client(kit) as sender:
        first = kit.start(WORKER_TEST_WORK_S="60", MRQ_STOP_TIMEOUT_S="1")
        await observer.wait_for(Heartbeat, pid=first.pid)
        await sender.send(f"{kit.service}.work", 8)
        await kit.wait_for_journal(lambda entries: "8" in entries_of(entries, "start", first.pid), "start")

        signalled_at = time.monotonic()
        first.send_signal(SIGTERM)
        exit_code = await first.wait_exit()
        stop_s = time.monotonic() - signalled_at
        await observer.wait_for(Goodbye, pid=first.pid)

        second = kit.start(WORKER_TEST_WORK_S="0")
        entries = await kit.wait_for_journal(
            lambda entries: "8" in entries_of(entries, "done", second.pid), "redelivered message done"
        )

    assert exit_code == 0
    assert 0.8 <= stop_s < 10
    assert "handler cancelled at the stop deadline" in first.stderr_text()
    assert entries_of(entries, "done", first.pid) == set()


@pytest.mark.timeout(60)
async def test_second_sigterm_exits_at_once(kit: WorkerKit) -> None:
    async with observe(kit) as observer, client(kit) as sender:
        worker = kit.start(WORKER_TEST_WORK_S="60", MRQ_STOP_TIMEOUT_S="30")
        await observer.wait_for(Heartbeat, pid=worker.pid)
        await sender.send(f"{kit.service}.work", 9)
        await kit.wait_for_journal(lambda entries: "9" in entries_of(entries, "start", worker.pid), "start")

        worker.send_signal(SIGTERM)
        await worker.wait_for_log("draining reason=signal SIGTERM")
        signalled_at = time.monotonic()
        worker.send_signal(SIGTERM)
        exit_code = await worker.wait_exit()
        exit_s = time.monotonic() - signalled_at

    assert exit_code == 128 + SIGTERM
    assert exit_s < 10
    assert "second signal, exiting now signal=SIGTERM" in worker.stderr_text()


@pytest.mark.timeout(90)
async def test_sigkill_mid_handler_loses_no_message(kit: WorkerKit) -> None:
    settings = {"WORKER_TEST_WORK_S": "0.25", "MRQ_PREFETCH": "4", "MRQ_CONCURRENCY": "4"}
    async with observe(kit) as observer, client(kit) as sender:
        doomed = kit.start(0, **settings)
        survivor = kit.start(1, **settings)
        await observer.wait_for(Heartbeat, pid=doomed.pid)
        await observer.wait_for(Heartbeat, pid=survivor.pid)
        for number in range(50):
            await sender.send(f"{kit.service}.work", number)

        await kit.wait_for_journal(
            lambda entries: len(entries_of(entries, "done", doomed.pid)) >= 5, "5 messages done"
        )
        doomed.send_signal(SIGKILL)
        assert await doomed.wait_exit() == -SIGKILL
        everything = {str(number) for number in range(50)}
        entries = await kit.wait_for_journal(
            lambda entries: everything <= {entry.body for entry in entries if entry.event == "done"},
            "all 50 messages done",
            timeout_s=60,
        )

    interrupted = entries_of(entries, "start", doomed.pid) - entries_of(entries, "done", doomed.pid)
    assert interrupted, "the killed instance had no handler in flight"
    assert interrupted <= entries_of(entries, "done", survivor.pid)


# Exit codes.


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"MRQ_TARGET": "nosuchmodule"}, ["'nosuchmodule'", "ModuleNotFoundError"], id="missing"),
        pytest.param(
            {"MRQ_TARGET": "importsmissing"},
            ["'importsmissing'", "ModuleNotFoundError"],
            id="imports-missing",
        ),
        pytest.param({"MRQ_TARGET": "broken"}, ["'broken'", "SyntaxError"], id="syntax-error"),
        pytest.param(
            {"MRQ_TARGET": "misdefined"},
            ["'misdefined'", "DefinitionError", "'_hidden'", "is reserved"],
            id="definition",
        ),
        pytest.param({"MRQ_TARGET": "empty"}, ["'empty'", "defines no service"], id="no-service"),
        pytest.param(
            {"MRQ_TARGET": "workersvc:nosuch"},
            ["'workersvc'", "no service named 'nosuch'"],
            id="no-such-name",
        ),
        pytest.param({"MRQ_PREFETCH": "abc"}, ["prefetch", "MRQ_PREFETCH='abc'", "integer"], id="prefetch"),
        pytest.param(
            {"MRQ_BROKER_URL": "http://x"}, ["broker_url", "MRQ_BROKER_URL='http://x'", "AMQP URL"], id="url"
        ),
    ],
)
@pytest.mark.timeout(60)
def test_configuration_error_exits_78(kit: WorkerKit, overrides: dict[str, str], expected: list[str]) -> None:
    kit.write_module("importsmissing", "import module_that_does_not_exist  # noqa: F401\n")
    kit.write_module("broken", "def broken(:\n    pass\n")
    kit.write_module("misdefined", MISDEFINED_MODULE)
    kit.write_module("empty", "VALUE = 1\n")

    worker = kit.start(**overrides)
    exit_code = worker.popen.wait(timeout=30)
    first_line = worker.stderr_lines()[0]

    assert exit_code == names.EXIT_CONFIG
    assert first_line.startswith("worker: ")
    for fragment in expected:
        assert fragment in first_line


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            "raise RuntimeError('exploded at import')\n", "RuntimeError: exploded at import", id="raises"
        ),
        pytest.param(
            "raise ConnectionError('database not reachable yet')\n",
            "ConnectionError: database not reachable yet",
            id="transient",
        ),
    ],
)
@pytest.mark.timeout(60)
def test_other_import_error_exits_1(kit: WorkerKit, source: str, expected: str) -> None:
    kit.write_module("exploding", source)

    worker = kit.start(MRQ_TARGET="exploding")
    exit_code = worker.popen.wait(timeout=30)
    first_line = worker.stderr_lines()[0]

    assert exit_code == 1
    assert first_line == f"worker: cannot import module 'exploding': {expected} (exit 1, a restart may help)"
    assert "Traceback" in worker.stderr_text()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"MRQ_TARGET": "failing"}, "on_start failed on purpose", id="on_start"),
        pytest.param({"MRQ_BROKER_URL": "closed-port"}, "cannot connect to the broker", id="closed-port"),
    ],
)
@pytest.mark.timeout(60)
def test_runtime_failure_exits_1(kit: WorkerKit, overrides: dict[str, str], expected: str) -> None:
    kit.write_module("failing", RAISING_ON_START_MODULE)
    if overrides.get("MRQ_BROKER_URL") == "closed-port":
        overrides = {"MRQ_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{closed_loopback_port()}/"}

    worker = kit.start(MRQ_CONNECT_TIMEOUT_S="5", **overrides)
    exit_code = worker.popen.wait(timeout=30)
    failure = [line for line in worker.stderr_lines() if "worker failed" in line]

    assert exit_code == 1
    assert len(failure) == 1
    assert expected in failure[0]


# Parent death and logs.


@pytest.mark.timeout(60)
async def test_worker_outlives_its_parent(kit: WorkerKit, tmp_path: Path) -> None:
    script = f"echo $$ >shell.pid; {PYTHON} -m worker >orphan.log 2>&1 & echo $! >worker.pid; sleep 30"
    async with observe(kit) as observer, client(kit) as sender:
        reaper = kit.start_reaper(["sh", "-c", script], kit.environment())
        hello = await observer.wait_for(Hello)
        shell_pid = int((tmp_path / "shell.pid").read_text())
        assert hello.pid == int((tmp_path / "worker.pid").read_text())
        assert psutil.Process(hello.pid).ppid() == shell_pid

        psutil.Process(shell_pid).send_signal(SIGKILL)
        orphaned_at = time.monotonic()
        await observer.wait_for_count(Heartbeat, 5, pid=hello.pid, since=orphaned_at)
        answer = await sender.call(f"{kit.service}.echo", {"parent": "gone"})
        new_parent = psutil.Process(hello.pid).ppid()

    assert not psutil.pid_exists(shell_pid) or psutil.Process(shell_pid).status() == psutil.STATUS_ZOMBIE
    assert new_parent == reaper.pid
    assert answer == {"parent": "gone"}


@pytest.mark.timeout(90)
async def test_json_logs_name_service_and_instance(kit: WorkerKit) -> None:
    async with client(kit) as sender:
        worker = kit.start(2, MRQ_LOG_FORMAT="json")
        await worker.wait_for_log("ready startup_ms=")
        # aio-pika and aiormq log a lost connection through the logging module.
        closed = await anyio.to_thread.run_sync(close_broker_connections, kit.broker_url, worker.pid)
        await worker.wait_for_log("broker connection restored")
        assert await sender.call(f"{kit.service}.echo", "hi") == "hi"
        worker.send_signal(SIGTERM)
        assert await worker.wait_exit() == 0

    assert closed == 1
    records = [orjson.loads(line) for line in worker.stderr_lines()]
    assert len(records) >= 4
    for record in records:
        assert isinstance(record, dict)
        assert {"time", "level", "message", "service", "instance"} <= record.keys()
        assert (record["service"], record["instance"]) == (kit.service, 2)
    messages = [record["message"] for record in records]
    assert any(message.startswith("ready startup_ms=") for message in messages)
    assert messages[-1] == "stopped processed=1 failed=0"
