"""Tests of the signed control commands of a real `python -m worker` process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from workerkit import ControlObserver, WorkerKit, WorkerProcess, exchange_exists, worker_kit

from sdk import Client, names, signing
from sdk.wire import Goodbye, Heartbeat, Hello

pytestmark = pytest.mark.anyio

# Long enough for a worker to reply to a command that it accepted.
NO_REPLY_WAIT_S = 1.5


@pytest.fixture
def kit(tmp_path: Path, broker_url: str, unique: str) -> Iterator[WorkerKit]:
    with worker_kit(tmp_path, broker_url, unique) as started:
        yield started


def observe(kit: WorkerKit) -> ControlObserver:
    return ControlObserver(kit.broker_url, kit.exchange, kit.cluster_key)


async def start_ready(kit: WorkerKit, observer: ControlObserver) -> WorkerProcess:
    worker = kit.start()
    await observer.wait_for(Heartbeat, pid=worker.pid)
    await worker.wait_for_log("ready startup_ms=")
    return worker


def command_key(kit: WorkerKit) -> str:
    return names.worker_command_key(kit.node, kit.service, 0)


@pytest.mark.timeout(60)
async def test_ping_and_stats_get_signed_replies(kit: WorkerKit) -> None:
    async with observe(kit) as observer:
        worker = await start_ready(kit, observer)
        ping = await observer.command(command_key(kit), "ping")
        stats = await observer.command(command_key(kit), "stats")

    assert ping.ok
    assert ping.node == kit.node
    assert ping.result["type"] == "hello"
    assert (ping.result["pid"], ping.result["service"]) == (worker.pid, kit.service)
    assert stats.ok
    assert (stats.result["processed"], stats.result["failed"], stats.result["in_flight"]) == (0, 0, 0)
    assert stats.result["rss_bytes"] > 10 * 2**20
    assert stats.result["heartbeat_seq"] >= 1
    assert stats.result["uptime_s"] > 0


@pytest.mark.timeout(60)
async def test_hello_command_announces_again(kit: WorkerKit) -> None:
    async with observe(kit) as observer:
        worker = await start_ready(kit, observer)
        requested_at = time.monotonic()
        reply = await observer.command(command_key(kit), "hello")
        hello = await observer.wait_for(Hello, pid=worker.pid, since=requested_at)

    assert reply.ok
    assert reply.result == {"announced": True}
    assert len(observer.of_type(Hello, worker.pid)) == 2
    assert hello.service == kit.service


@pytest.mark.timeout(60)
async def test_unknown_command_gets_error_reply(kit: WorkerKit) -> None:
    async with observe(kit) as observer:
        await start_ready(kit, observer)
        reply = await observer.command(command_key(kit), "dance")

    assert not reply.ok
    assert reply.error is not None
    assert "unknown command 'dance'" in reply.error


@pytest.mark.timeout(60)
async def test_drain_stops_consuming_and_stop_exits(kit: WorkerKit) -> None:
    queue = f"{kit.service}.work"
    async with observe(kit) as observer, Client(kit.broker_url, exchange=kit.exchange) as sender:
        worker = await start_ready(kit, observer)
        drained = await observer.command(command_key(kit), "drain")
        drained_at = time.monotonic()
        await sender.send(queue, 1)
        await anyio.sleep(1.0)
        ready, consumers = await observer.queue_counts(queue)
        beats = await observer.wait_for_count(Heartbeat, 3, pid=worker.pid, since=drained_at)
        alive_after_drain = worker.alive()

        stopped = await observer.command(command_key(kit), "stop")
        exit_code = await worker.wait_exit()
        goodbye = await observer.wait_for(Goodbye, pid=worker.pid)

    assert drained.ok
    assert drained.result == {"drained": True, "in_flight": 0}
    assert (ready, consumers) == (1, 0)
    assert kit.journal_entries() == []
    assert alive_after_drain
    assert beats[-1].processed == 0
    assert stopped.ok
    assert stopped.result == {"stopping": True}
    assert exit_code == 0
    assert goodbye.reason == "stop command from worker-tests"


@pytest.mark.timeout(60)
async def test_invalid_commands_are_rejected_and_logged(kit: WorkerKit) -> None:
    key = command_key(kit)
    async with observe(kit) as observer:
        # Issued before the worker started, within the age window: a replay to a new process.
        before_start = observer.signed_command("stop", target=key)
        await anyio.sleep(0.1)
        worker = await start_ready(kit, observer)
        stop, _headers = observer.signed_command("stop", target=key)
        wrong_key = observer.signed_command("stop", target=key, key=b"another-key")
        stale = observer.signed_command("stop", target=key, issued_at=time.time() - 600)
        malformed = (b"{not json", signing.sign_headers(kit.cluster_key, b"{not json"))
        oversized = observer.signed_command("stop", {"padding": "x" * 70_000}, target=key)
        # Captured on its way to instance 1 and sent to instance 0.
        misdirected = observer.signed_command(
            "stop", target=names.worker_command_key(kit.node, kit.service, 1)
        )
        expired = observer.signed_command("stop", target=key, expires_at=time.time() - 1)
        replayed = observer.signed_command("ping", target=key)
        # The log shows the first rejection of each kind at once, so the stale command
        # that was issued before the start goes before the one that is too old.
        sent = [
            await observer.publish_command(key, stop, None),
            await observer.publish_command(key, *wrong_key),
            await observer.publish_command(key, *before_start),
            await observer.publish_command(key, *stale),
            await observer.publish_command(key, *malformed),
            await observer.publish_command(key, *oversized),
            await observer.publish_command(key, *misdirected),
            await observer.publish_command(key, *expired),
        ]
        first_ping = await observer.publish_command(key, *replayed)
        replay = await observer.publish_command(key, *replayed)
        answered = await observer.wait_reply(first_ping)
        for reason in (
            "unsigned",
            "bad signature",
            "stale: issued before this receiver started",
            "malformed",
            "oversized",
            "misdirected",
            "expired",
            "replayed",
        ):
            await worker.wait_for_log(f"command rejected reason={reason}")
        checked_at = time.monotonic()
        await anyio.sleep(NO_REPLY_WAIT_S)
        beats = observer.of_type(Heartbeat, worker.pid, since=checked_at)

        assert worker.alive()

    assert answered.ok
    assert [correlation for correlation in [*sent, replay] if correlation in observer.replies] == []
    assert len(beats) >= 3
    assert observer.of_type(Goodbye, worker.pid) == []
    assert "draining" not in worker.stderr_text()


@pytest.mark.timeout(60)
async def test_commands_disabled_without_cluster_key(kit: WorkerKit) -> None:
    worker = kit.start(MRQ_CLUSTER_KEY="")
    await worker.wait_for_log("ready startup_ms=")
    # The worker declares the control exchange itself: nothing else has declared it here.
    assert await exchange_exists(kit.broker_url, names.control_exchange(kit.exchange))

    async with observe(kit) as observer:
        body, headers = observer.signed_command("stop", target=command_key(kit))
        correlation_id = await observer.publish_command(command_key(kit), body, headers)
        sent_at = time.monotonic()
        await anyio.sleep(NO_REPLY_WAIT_S)
        beats = await observer.wait_for_count(Heartbeat, 3, pid=worker.pid, since=sent_at)

        assert worker.alive()

    disabled = await worker.wait_for_log("control commands disabled")
    assert "MRQ_CLUSTER_KEY" in disabled
    assert correlation_id not in observer.replies
    assert [beat.seq for beat in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    assert "broker connection lost" not in worker.stderr_text()
