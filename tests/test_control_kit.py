"""Helpers for the control-plane and CLI tests: real supervisors and the real CLI as subprocesses.

This module holds no tests. `SupervisorProcess` runs `mrq-supervisor start` on a
config written into a test folder and, when the test ends, stops it (SIGTERM,
then SIGKILL) and kills whatever instance it left behind, found by the state
folder marker in the environment of its children.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]
ORPHAN_MARKER = "MRQ_SUPERVISOR_STATE_DIR"
CLUSTER_KEY = "test-cluster-key-" + "k" * 24
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 90.0

# A Python service whose name comes from MRQ_SERVICE_NAME (set by the supervisor).
SERVICE_MODULE = """
from sdk import microservice


@microservice("echo")
async def echo(body):
    return body


@microservice("fail")
async def fail(body):
    raise ValueError(f"failed on purpose: {body}")
"""
SERVICE_MODULE_NAME = "ctl_test_service"


def vhost_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"


def write_config(
    folder: Path,
    *,
    node: str,
    broker_url: str,
    exchange: str,
    services: Mapping[str, Mapping[str, Any]],
    key: str | None = CLUSTER_KEY,
    extra: str = "",
) -> Path:
    """Write supervisor.toml and the test service module into `folder` and return the config path.

    With `key=None` the file names no cluster key, so the supervisor generates one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SERVICE_MODULE_NAME}.py").write_text(SERVICE_MODULE)
    lines = [
        "[supervisor]",
        f"node = {json.dumps(node)}",
        f"broker = {json.dumps(broker_url)}",
        f"exchange = {json.dumps(exchange)}",
        'state_dir = "state"',
        "heartbeat_interval_s = 0.2",
        "start_timeout_s = 20",
        'dashboard = "off"',
    ]
    if key is not None:
        lines.append(f"cluster_key = {json.dumps(key)}")
    lines.append(extra)
    for name, settings in services.items():
        lines.append(f"\n[services.{name}]")
        for item, value in settings.items():
            lines.append(f"{item} = {_toml(value)}")
    path = folder / "supervisor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def python_service(folder: Path, replicas: int = 1, **more: Any) -> dict[str, Any]:
    """Return the settings of a service that runs SERVICE_MODULE, written into `folder`."""
    return {
        "module": SERVICE_MODULE_NAME,
        "replicas": replicas,
        "stop_timeout_s": 5,
        "env": {"PYTHONPATH": f"{folder}:{REPO}"},
        **more,
    }


def program_service(replicas: int = 1) -> dict[str, Any]:
    """Return the settings of a program service: `sleep`, with no heartbeat."""
    return {"command": ["sleep", "100000"], "replicas": replicas, "stop_timeout_s": 5}


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@dataclass
class SupervisorProcess:
    """A `mrq-supervisor start` subprocess with its output in files."""

    config: Path
    popen: subprocess.Popen[bytes] | None = None
    stdout_path: Path = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stdout_path = self.config.parent / "supervisor.stdout"
        self.stderr_path = self.config.parent / "supervisor.stderr"

    @property
    def folder(self) -> Path:
        return self.config.parent

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MRQ_")}
        env["PYTHONPATH"] = str(REPO)
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.popen = subprocess.Popen(
                [PYTHON, "-m", "supervisor.cli", "start", "-c", str(self.config)],
                cwd=self.folder,
                stdout=out,
                stderr=err,
                env=env,
            )

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_for_log(self, fragment: str, timeout_s: float = READY_TIMEOUT_S, *, after: int = 0) -> str:
        """Return the log from `after` on once it contains `fragment`; fail when the process exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log()[after:]
            if fragment in text:
                return text
            if self.popen is not None and self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"supervisor {self.config} logged no {fragment!r} within {timeout_s:g} s "
            f"(exit code {self.popen.poll() if self.popen else None}); log:\n{self.log()[-4000:]}"
        )

    def start_and_wait(self) -> None:
        """Start and wait for this start's "supervisor ready" (an earlier run's line does not count)."""
        offset = len(self.log())
        self.start()
        self.wait_for_log("supervisor ready", after=offset)

    def exit_code(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout_s)

    def children(self) -> list[psutil.Process]:
        """Return the live processes that carry this supervisor's state folder marker."""
        marker = str(self.state_dir.resolve())
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get(ORPHAN_MARKER) == marker and process.status() != "zombie":
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self) -> list[int]:
        """SIGTERM, then SIGKILL the supervisor; kill and return the pids of instances it left."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        left = self.children()
        for process in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=10)
        return [process.pid for process in left]


def run_cli(
    config: Path, *args: str, timeout_s: float = CLI_TIMEOUT_S, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `mrq-supervisor ARGS -c CONFIG` and return the finished process."""
    return subprocess.run(
        [PYTHON, "-m", "supervisor.cli", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=_cli_env(env),
        cwd=config.parent,
        check=False,
    )


def spawn_cli(config: Path, *args: str, output: Path) -> subprocess.Popen[bytes]:
    """Start a long-running CLI command (`-f`, `--watch`) with stdout and stderr in files."""
    with output.with_suffix(".out").open("wb") as out, output.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(
            [PYTHON, "-m", "supervisor.cli", *args, "-c", str(config)],
            stdout=out,
            stderr=err,
            env=_cli_env(None),
            cwd=config.parent,
        )


def _cli_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRQ_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def wait_for_file_text(path: Path, fragment: str, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if fragment in text:
            return text
        time.sleep(0.05)
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"{path} got no {fragment!r} within {timeout_s:g} s; it has:\n{text[-4000:]}")


def interrupt(process: subprocess.Popen[bytes]) -> int:
    """Stop a long-running CLI command with SIGINT (Ctrl-C) and return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def status_rows(config: Path, *args: str) -> list[dict[str, Any]]:
    """Return the instances of `status --json`; fail unless the command succeeded."""
    result = run_cli(config, "status", "--json", *args)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    return [row for node in document["nodes"].values() for row in node["instances"]]


def instance_row(config: Path, service: str, index: int) -> dict[str, Any]:
    rows = [r for r in status_rows(config) if r["service"] == service and r["instance"] == index]
    assert len(rows) == 1, rows
    return rows[0]


def wait_until(predicate: Any, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s:g} s")


def supervisors(*processes: SupervisorProcess) -> Iterator[None]:
    """Yield, then stop every supervisor and check that none left an instance behind."""
    try:
        yield
    finally:
        leftovers = [pid for process in processes for pid in process.stop()]
        assert leftovers == [], f"instances left running after their supervisor stopped: {leftovers}"


async def publish_raw(
    broker_url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any] | None,
    reply_wait_s: float = 0.0,
) -> list[bytes]:
    """Publish one message with plain aio-pika and return the reply bodies that came within `reply_wait_s`."""
    replies = await publish_raw_many(broker_url, exchange, routing_key, [(body, headers)], reply_wait_s)
    return [reply for _correlation_id, reply in replies]


async def publish_raw_many(
    broker_url: str,
    exchange: str,
    routing_key: str,
    messages: Sequence[tuple[bytes, Mapping[str, Any] | None]],
    reply_wait_s: float = 0.0,
) -> list[tuple[str | None, bytes]]:
    """Publish the messages with plain aio-pika, then wait `reply_wait_s` once.

    Return the replies that came as (correlation id, body). Message N of `messages`
    (from 1) has the correlation id `raw-N`.
    """
    import aio_pika
    import anyio

    replies: list[tuple[str | None, bytes]] = []
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        reply_queue = await channel.declare_queue("amq.rabbitmq.reply-to", passive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            replies.append((message.correlation_id, message.body))

        await reply_queue.consume(on_reply, no_ack=True)
        target = await channel.get_exchange(exchange, ensure=False)
        for number, (body, headers) in enumerate(messages, start=1):
            message = aio_pika.Message(
                body,
                headers=dict(headers) if headers else None,
                reply_to="amq.rabbitmq.reply-to",
                correlation_id=f"raw-{number}",
                content_type="application/json",
            )
            await target.publish(message, routing_key=routing_key)
        await anyio.sleep(reply_wait_s)
    return replies
