"""Shared fixtures: a RabbitMQ virtual host per test session, unique names per test.

Tests talk to the real broker on 127.0.0.1:5672. Each session works in a
virtual host of its own, deleted at the end, and each test uses names with
a random suffix, so that runs and tests never see each other's queues.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from sdk.service import registry
from sdk.settings import SettingsModel, settings

# A test run started as a shell's background job ignores SIGINT, and its children
# would inherit that; the tests send SIGINT to the CLI and to programs on purpose.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
VHOST_PREFIX = "mrq-test-"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=60, check=False)


def _remove_stale_vhosts() -> None:
    """Delete the virtual hosts of earlier sessions whose process is gone."""
    listing = _rabbitmqctl("list_vhosts", "name", "-q").stdout.split()
    for vhost in listing:
        if not vhost.startswith(VHOST_PREFIX):
            continue
        pid = vhost[len(VHOST_PREFIX) :].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def test_vhost() -> Iterator[str]:
    try:
        socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=5).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ does not answer on {BROKER_HOST}:{BROKER_PORT} ({exc}); "
            "start it with `rabbitmq-server -detached` or run scripts/test, which starts it"
        )
    _remove_stale_vhosts()
    vhost = f"{VHOST_PREFIX}{os.getpid()}-{os.urandom(3).hex()}"
    created = _rabbitmqctl("add_vhost", vhost)
    assert created.returncode == 0, f"rabbitmqctl add_vhost failed: {created.stderr}"
    granted = _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    assert granted.returncode == 0, f"rabbitmqctl set_permissions failed: {granted.stderr}"
    yield vhost
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def broker_url(test_vhost: str) -> str:
    return f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{quote(test_vhost, safe='')}"


@pytest.fixture
def unique() -> str:
    """A random suffix for the names of one test."""
    return os.urandom(4).hex()


@pytest.fixture
def mrq_settings(broker_url: str, unique: str) -> SettingsModel:
    """Settings for one test: its own exchange in the session's virtual host."""
    return settings.resolve(broker_url=broker_url, exchange=f"t{unique}", retry_delay_s=0.05)


@pytest.fixture(autouse=True)
def _isolation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give each test an empty service registry, default settings and no MRQ_* variables."""
    for name in list(os.environ):
        if name.startswith("MRQ_") or name == "SETTINGS_MODULE":
            monkeypatch.delenv(name)
    settings.reset()
    with registry.isolated():
        yield
    settings.reset()
