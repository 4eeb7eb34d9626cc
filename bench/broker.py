"""The benchmarks' broker: a virtual host per benchmark on the local RabbitMQ, made with rabbitmqctl.

Every benchmark runs in a virtual host of its own, so deleting that virtual
host deletes every queue and exchange that the benchmark and its children
declared. A run that dies leaves its virtual host behind; the next run
deletes it, because the process id in its name is gone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from urllib.parse import quote

import aio_pika
import anyio
from loguru import logger

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
VHOST_PREFIX = "mrq-bench-"
RABBITMQCTL_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


class BrokerSetupError(Exception):
    """The local RabbitMQ is missing, refuses connections, or rejected a rabbitmqctl command."""


def _rabbitmqctl_path() -> str:
    executable = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not os.path.exists(executable):
        raise BrokerSetupError(
            "rabbitmqctl not found on PATH or in /usr/sbin; install RabbitMQ "
            "(apt-get install rabbitmq-server) or run scripts/bench, which sets it up"
        )
    return executable


def _process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def _rabbitmqctl(*args: str) -> str:
    executable = _rabbitmqctl_path()
    with anyio.fail_after(RABBITMQCTL_TIMEOUT_S):
        result = await anyio.run_process([executable, *args], check=False)
    if result.returncode != 0:
        raise BrokerSetupError(
            f"rabbitmqctl {' '.join(args)} failed with exit code {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


def vhost_url(vhost: str) -> str:
    return f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{quote(vhost, safe='')}"


@dataclass(frozen=True)
class BenchVhost:
    """A virtual host made for one benchmark, with guest allowed everything in it."""

    name: str

    @property
    def url(self) -> str:
        return vhost_url(self.name)

    @classmethod
    async def create(cls, benchmark: str) -> BenchVhost:
        name = f"{VHOST_PREFIX}{os.getpid()}-{benchmark}-{os.urandom(3).hex()}"
        await _rabbitmqctl("add_vhost", name)
        await _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        logger.debug("vhost created name={}", name)
        return cls(name)

    async def delete(self) -> None:
        with anyio.CancelScope(shield=True):
            await _rabbitmqctl("delete_vhost", self.name)
        logger.debug("vhost deleted name={}", self.name)


async def remove_stale_vhosts() -> None:
    """Delete the virtual hosts of earlier runs whose process is gone."""
    listing = await _rabbitmqctl("list_vhosts", "name", "-q")
    for vhost in listing.split():
        if not vhost.startswith(VHOST_PREFIX):
            continue
        pid = vhost[len(VHOST_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            logger.info("stale vhost deleted name={}", vhost)
            await _rabbitmqctl("delete_vhost", vhost)


async def check_broker() -> None:
    """Raise BrokerSetupError unless RabbitMQ accepts TCP connections on the local port."""
    try:
        with anyio.fail_after(CONNECT_TIMEOUT_S):
            stream = await anyio.connect_tcp(BROKER_HOST, BROKER_PORT)
    except (OSError, TimeoutError) as exc:
        raise BrokerSetupError(
            f"RabbitMQ accepts no connection on {BROKER_HOST}:{BROKER_PORT} ({exc}); "
            "run scripts/bench, which starts it, or start it with rabbitmq-server -detached"
        ) from exc
    await stream.aclose()


async def server_version() -> str:
    """Return the RabbitMQ version that the broker announces when a client connects."""
    with anyio.fail_after(CONNECT_TIMEOUT_S):
        connection = await aio_pika.connect(vhost_url("/"), timeout=CONNECT_TIMEOUT_S)
    try:
        transport = connection.transport
        properties = transport.connection.server_properties if transport is not None else {}
        version = properties.get("version", b"unknown")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        with anyio.CancelScope(shield=True):
            await connection.close()
