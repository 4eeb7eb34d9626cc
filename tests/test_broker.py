"""Tests of supervisor.broker against real private RabbitMQ nodes on 127.0.0.1.

Each node lives in a tmp folder of its own and is stopped when its test ends, or for
shared_node when the module ends. Only
test_resolve_auto_uses_local_broker touches the shared broker on 127.0.0.1:5672, with a
handshake and nothing else.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import psutil
import pytest

from supervisor.broker import (
    LOCAL_BROKER_URL,
    BrokerConfigError,
    BrokerStartError,
    BrokerUnavailableError,
    PrivateBroker,
    probe_amqp,
    resolve_broker,
)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The backend of tests/conftest.py, at module scope for the shared_node fixture."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
async def shared_node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateBroker]:
    """A node for the tests that neither stop nor restart it."""
    broker = PrivateBroker(tmp_path_factory.mktemp("shared") / "node")
    await broker.start(START_TIMEOUT_S)
    try:
        yield broker
    finally:
        await broker.stop(STOP_TIMEOUT_S)


@pytest.fixture
async def own_node(tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    """A node for one test, which that test may stop or restart."""
    broker = PrivateBroker(tmp_path / "node")
    await broker.start(START_TIMEOUT_S)
    try:
        yield broker
    finally:
        await broker.stop(STOP_TIMEOUT_S)


@pytest.fixture
def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port whose listener accepts TCP connections but never speaks AMQP."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def node_processes(broker: PrivateBroker) -> list[psutil.Process]:
    assert broker.pid is not None
    leader = psutil.Process(broker.pid)
    return [leader, *leader.children(recursive=True)]


def running_pids(processes: list[psutil.Process]) -> list[int]:
    """Return the pids still running. A zombie counts as exited, though no one reaped it."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return running


def processes_of_node(node_name: str) -> list[psutil.Process]:
    """Return the live processes started with RABBITMQ_NODENAME=node_name."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RABBITMQ_NODENAME") == node_name and running_pids([process]):
                found.append(process)
        except psutil.Error:
            pass
    return found


async def epmd_names() -> str:
    with anyio.fail_after(20):
        result = await anyio.run_process(["epmd", "-names"], check=False)
    return result.stdout.decode()


async def publish(url: str, queue_name: str, body: bytes, *, durable: bool) -> None:
    mode = aio_pika.DeliveryMode.PERSISTENT if durable else aio_pika.DeliveryMode.NOT_PERSISTENT
    message = aio_pika.Message(body, delivery_mode=mode)
    with anyio.fail_after(30):
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            await channel.declare_queue(queue_name, durable=durable)
            await channel.default_exchange.publish(message, routing_key=queue_name)


async def consume_one(url: str, queue_name: str, *, durable: bool) -> bytes:
    with anyio.fail_after(30):
        async with await aio_pika.connect(url, timeout=10) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, durable=durable)
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    return message.body
    raise AssertionError(f"queue {queue_name} ended without a message")


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_started_node_serves_publish_and_consume(shared_node: PrivateBroker) -> None:
    assert shared_node.url == f"amqp://guest:guest@127.0.0.1:{shared_node.amqp_port}/"

    await publish(shared_node.url, "broker-test-transient", b"hello", durable=False)
    body = await consume_one(shared_node.url, "broker-test-transient", durable=False)

    assert body == b"hello"


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_node_listens_on_loopback_only(shared_node: PrivateBroker) -> None:
    assert shared_node.pid is not None
    beam = next(p for p in node_processes(shared_node) if p.name() == "beam.smp")
    listeners = [c.laddr for c in beam.net_connections("inet") if c.status == psutil.CONN_LISTEN]

    assert len(listeners) >= 2  # AMQP and Erlang distribution
    assert {address.ip for address in listeners} == {"127.0.0.1"}
    assert shared_node.amqp_port in {address.port for address in listeners}


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_probe_amqp_true_only_for_broker(
    shared_node: PrivateBroker, closed_port: int, silent_listener: int
) -> None:
    wrong_password = f"amqp://guest:wrong@127.0.0.1:{shared_node.amqp_port}/"

    assert await probe_amqp(shared_node.url, timeout_s=10) is True
    assert await probe_amqp(wrong_password, timeout_s=10) is False
    assert await probe_amqp(f"amqp://guest:guest@127.0.0.1:{closed_port}/", 5) is False
    assert await probe_amqp("amqp:///", 5) is False

    with anyio.fail_after(10):
        silent = await probe_amqp(f"amqp://guest:guest@127.0.0.1:{silent_listener}/", 1)
    assert silent is False


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_close_connections_cuts_named_client(shared_node: PrivateBroker) -> None:
    victim_closed = anyio.Event()
    victim = await aio_pika.connect(
        shared_node.url, timeout=10, client_properties={"connection_name": "victim-7"}
    )
    victim.close_callbacks.add(lambda *_: victim_closed.set())
    bystander = await aio_pika.connect(
        shared_node.url, timeout=10, client_properties={"connection_name": "bystander"}
    )
    try:
        with anyio.fail_after(60):
            closed_count = await shared_node.close_connections("victim")
            await victim_closed.wait()
            channel = await bystander.channel()
            await channel.declare_queue("broker-test-bystander", auto_delete=True)

        assert closed_count == 1
        assert not bystander.is_closed
    finally:
        with anyio.fail_after(20):
            await victim.close()
            await bystander.close()


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_second_owner_of_folder_is_rejected(shared_node: PrivateBroker) -> None:
    intruder = PrivateBroker(shared_node.base_dir)

    with pytest.raises(BrokerStartError, match="is in use by another PrivateBroker"):
        await intruder.start(START_TIMEOUT_S)

    assert await probe_amqp(shared_node.url, timeout_s=10) is True


@pytest.mark.private_broker
@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_restart_keeps_port_and_persistent_messages(own_node: PrivateBroker) -> None:
    port_before = own_node.amqp_port
    pid_before = own_node.pid
    await publish(own_node.url, "broker-test-durable", b"survives", durable=True)

    await own_node.restart()

    assert own_node.amqp_port == port_before
    assert own_node.pid != pid_before
    body = await consume_one(own_node.url, "broker-test-durable", durable=True)
    assert body == b"survives"


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_stop_leaves_no_process_of_node(own_node: PrivateBroker) -> None:
    processes = node_processes(own_node)
    short_name = own_node.node_name.split("@")[0]
    assert {"beam.smp", "erl_child_setup"} <= {p.name() for p in processes}
    assert f"name {short_name} " in await epmd_names()

    await own_node.stop(STOP_TIMEOUT_S)
    await own_node.stop(STOP_TIMEOUT_S)

    assert own_node.pid is None
    assert running_pids(processes) == []
    assert processes_of_node(own_node.node_name) == []
    assert f"name {short_name} " not in await epmd_names()
    assert await probe_amqp(own_node.url, timeout_s=5) is False


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_cancelled_stop_still_kills_and_reaps(own_node: PrivateBroker) -> None:
    processes = node_processes(own_node)

    with anyio.move_on_after(0.05) as scope:
        await own_node.stop(STOP_TIMEOUT_S)

    assert scope.cancelled_caught
    assert own_node.pid is None
    assert running_pids(processes) == []


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_start_failure_quotes_node_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = PrivateBroker(tmp_path / "node", amqp_port=taken.getsockname()[1])

        with pytest.raises(BrokerStartError, match="eaddrinuse") as caught:
            await broker.start(START_TIMEOUT_S)

    message = str(caught.value)
    assert str(broker.log_file) in message
    assert "exited with code" in message
    assert broker.pid is None
    assert processes_of_node(broker.node_name) == []


@pytest.mark.private_broker
@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_start_stops_orphan_of_crashed_owner(tmp_path: Path) -> None:
    folder = tmp_path / "node"
    crashed_owner = (
        "import anyio, os, sys\n"
        "from pathlib import Path\n"
        "from supervisor.broker import PrivateBroker\n"
        "async def main():\n"
        "    broker = PrivateBroker(Path(sys.argv[1]))\n"
        "    await broker.start(60)\n"
        "    os._exit(0)\n"
        "anyio.run(main)\n"
    )
    with anyio.fail_after(90):
        await anyio.run_process([sys.executable, "-c", crashed_owner, str(folder)], cwd=REPO_ROOT)
    broker = PrivateBroker(folder)
    orphans = processes_of_node(broker.node_name)
    assert orphans != []

    try:
        await broker.start(START_TIMEOUT_S)

        assert running_pids(orphans) == []
        assert await probe_amqp(broker.url, timeout_s=10) is True
    finally:
        await broker.stop(STOP_TIMEOUT_S)
        for orphan in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()


@pytest.mark.timeout(30)
@pytest.mark.anyio
async def test_resolve_auto_uses_local_broker(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"

    url, broker = await resolve_broker("auto", state_dir, timeout_s=10)
    if broker is not None:
        await broker.stop(STOP_TIMEOUT_S)

    assert url == LOCAL_BROKER_URL
    assert broker is None
    assert not state_dir.exists()


@pytest.mark.private_broker
@pytest.mark.timeout(90)
@pytest.mark.anyio
async def test_resolve_auto_starts_private_node(tmp_path: Path, closed_port: int) -> None:
    local_url = f"amqp://guest:guest@127.0.0.1:{closed_port}/"

    url, broker = await resolve_broker("auto", tmp_path / "state", 60, local_url=local_url)
    try:
        assert broker is not None
        assert url == broker.url
        assert broker.base_dir == tmp_path / "state" / "broker"
        assert await probe_amqp(url, timeout_s=10) is True
    finally:
        if broker is not None:
            await broker.stop(STOP_TIMEOUT_S)


@pytest.mark.timeout(30)
@pytest.mark.anyio
async def test_resolve_auto_without_server_explains_fix(tmp_path: Path, closed_port: int) -> None:
    local_url = f"amqp://guest:guest@127.0.0.1:{closed_port}/"

    with pytest.raises(BrokerUnavailableError, match="apt-get install rabbitmq-server") as caught:
        await resolve_broker("auto", tmp_path, 5, local_url=local_url, find_server=lambda: None)

    assert "MRQ_BROKER_URL" in str(caught.value)
    assert 'broker = "amqp://' in str(caught.value)
    assert "[supervisor]" in str(caught.value)


@pytest.mark.timeout(10)
@pytest.mark.anyio
async def test_resolve_returns_url_setting_unchanged(tmp_path: Path) -> None:
    setting = "amqps://app:secret@127.0.0.1:5671/orders"

    url, broker = await resolve_broker(setting, tmp_path, timeout_s=5)

    assert url == setting
    assert broker is None


@pytest.mark.timeout(10)
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("http://guest:secret@127.0.0.1:5672/", "http://guest:***@127.0.0.1:5672/"),
        ("Auto", "Auto"),
        ("127.0.0.1:5672", "127.0.0.1:5672"),
        ("amqp://", "amqp://"),
    ],
)
async def test_resolve_rejects_bad_setting(tmp_path: Path, setting: str, shown: str) -> None:
    with pytest.raises(BrokerConfigError, match='expected "auto" or a URL') as caught:
        await resolve_broker(setting, tmp_path, timeout_s=5)

    assert repr(shown) in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.timeout(10)
def test_bad_name_prefix_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match="invalid name_prefix 'my node'"):
        PrivateBroker(tmp_path, name_prefix="my node")
