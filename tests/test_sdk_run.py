"""Tests of `run()` in a real child process: start-up log lines, SIGTERM draining, a second signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from sdk import Client
from sdk.settings import SettingsModel

# A class service whose `slow` route records its start and end in a file and on stderr.
JOBS_MODULE = """
import os
import sys

import anyio

from sdk import Context, Service, route


class Jobs(Service):
    name = os.environ["JOBS_SERVICE"]

    @route("slow")
    async def slow(self, ctx: Context) -> None:
        await record(f"start {ctx.body}")
        await anyio.sleep(float(os.environ["JOBS_SLEEP_S"]))
        await record(f"done {ctx.body}")

    async def handle(self, ctx: Context) -> str:
        return "pong"


async def record(line: str) -> None:
    async with await anyio.open_file(os.environ["JOBS_RECORD"], "a") as file:
        await file.write(line + "\\n")
    print(f"handler {line}", file=sys.stderr, flush=True)
"""

# A function service that takes its name from MRQ_SERVICE_NAME.
ECHO_MODULE = """
from sdk import Context, microservice


@microservice(route="echo")
async def echo(ctx: Context) -> object:
    return {"service": ctx.service, "body": ctx.body}
"""


class RunningService:
    """A child process running `run()`, with its stderr lines collected as they arrive."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = anyio.Event()

    async def collect_stderr(self) -> None:
        assert self.process.stderr is not None
        stream = BufferedByteReceiveStream(self.process.stderr)
        while True:
            try:
                line = await stream.receive_until(b"\n", 1 << 20)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                break
            self.lines.append(line.decode(errors="replace"))
            self._changed.set()
            self._changed = anyio.Event()
        self._changed.set()

    async def wait_line(self, text: str, timeout_s: float = 30) -> str:
        """Return the first stderr line containing `text`; fail after `timeout_s`."""
        with anyio.fail_after(timeout_s):
            while True:
                changed = self._changed
                for line in self.lines:
                    if text in line:
                        return line
                if self.process.returncode is not None and changed.is_set():
                    raise AssertionError(f"process exited without logging {text!r}:\n{self.output()}")
                await changed.wait()

    async def wait_exit(self, timeout_s: float = 30) -> int:
        with anyio.fail_after(timeout_s):
            return await self.process.wait()

    def output(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def run_module(tmp_path: Path, module: str, env: dict[str, str]) -> AsyncIterator[RunningService]:
    """Start `python -c "import MODULE; from sdk import run; run()"` in `tmp_path`; kill it on exit."""
    command = [sys.executable, "-c", f"import {module}; from sdk import run; run()"]
    python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONPATH": python_path, **env}
    process = await anyio.open_process(
        command, cwd=tmp_path, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    running = RunningService(process)
    async with process, anyio.create_task_group() as group:
        group.start_soon(running.collect_stderr)
        try:
            yield running
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(10):
                await process.wait()


def jobs_env(mrq_settings: SettingsModel, tmp_path: Path, service: str, sleep_s: float) -> dict[str, str]:
    return {
        "MRQ_BROKER_URL": mrq_settings.broker_url,
        "MRQ_EXCHANGE": mrq_settings.exchange,
        "MRQ_STOP_TIMEOUT_S": "60",
        "JOBS_SERVICE": service,
        "JOBS_SLEEP_S": str(sleep_s),
        "JOBS_RECORD": str(tmp_path / "record.txt"),
    }


async def ready_count(broker_url: str, queue_name: str) -> int:
    connection = await aio_pika.connect(broker_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


@pytest.fixture
def jobs_module(tmp_path: Path, unique: str) -> str:
    name = f"jobs{unique}"
    (tmp_path / f"{name}.py").write_text(JOBS_MODULE)
    return name


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_run_logs_services_routes_and_masked_url(
    mrq_settings: SettingsModel, tmp_path: Path, unique: str, jobs_module: str
) -> None:
    service = f"jobs{unique}"
    env = jobs_env(mrq_settings, tmp_path, service, 0)

    async with run_module(tmp_path, jobs_module, env) as running:
        serving = await running.wait_line("serving services=")
        slow_route = await running.wait_line(f"queue={service}.slow ")
        default_route = await running.wait_line(f"queue={service} ")
        async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
            reply = await client.call(service, None, timeout=10)
        running.process.send_signal(signal.SIGTERM)
        exit_code = await running.wait_exit()

    masked = mrq_settings.broker_url.replace("guest:guest@", "guest:***@")
    assert f"serving services={service} broker={masked} exchange={mrq_settings.exchange}" in serving
    assert f"route service={service} queue={service}.slow kind=route" in slow_route
    assert f"route service={service} queue={service} kind=route" in default_route
    assert ":guest@" not in running.output()
    assert reply == "pong"
    assert exit_code == 0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_sigterm_lets_handler_finish_and_acks_once(
    mrq_settings: SettingsModel, tmp_path: Path, unique: str, jobs_module: str
) -> None:
    service = f"jobs{unique}"
    env = jobs_env(mrq_settings, tmp_path, service, 2.0)

    async with run_module(tmp_path, jobs_module, env) as running:
        await running.wait_line("serving services=")
        async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
            await client.send(f"{service}.slow", 1)
        await running.wait_line("handler start 1")
        running.process.send_signal(signal.SIGTERM)
        await running.wait_line("stopping signal=SIGTERM")
        exit_code = await running.wait_exit()

    record = (tmp_path / "record.txt").read_text().splitlines()
    assert exit_code == 0, running.output()
    assert record == ["start 1", "done 1"]
    assert "stopped processed=1 failed=0" in running.output()
    assert await ready_count(mrq_settings.broker_url, f"{service}.slow") == 0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_second_sigterm_exits_at_once(
    mrq_settings: SettingsModel, tmp_path: Path, unique: str, jobs_module: str
) -> None:
    service = f"jobs{unique}"
    env = jobs_env(mrq_settings, tmp_path, service, 60.0)

    async with run_module(tmp_path, jobs_module, env) as running:
        await running.wait_line("serving services=")
        async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
            await client.send(f"{service}.slow", 1)
        await running.wait_line("handler start 1")
        running.process.send_signal(signal.SIGTERM)
        await running.wait_line("stopping signal=SIGTERM")
        running.process.send_signal(signal.SIGTERM)
        exit_code = await running.wait_exit(timeout_s=10)

    assert exit_code == 143
    assert "second signal, exiting now signal=SIGTERM" in running.output()
    assert (tmp_path / "record.txt").read_text().splitlines() == ["start 1"]
    # The unfinished message was never acked, so the broker keeps it for the next consumer.
    assert await ready_count(mrq_settings.broker_url, f"{service}.slow") == 1


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_run_names_function_service_from_env(
    mrq_settings: SettingsModel, tmp_path: Path, unique: str
) -> None:
    module = f"echo{unique}"
    service = f"echo{unique}"
    (tmp_path / f"{module}.py").write_text(ECHO_MODULE)
    env = {
        "MRQ_BROKER_URL": mrq_settings.broker_url,
        "MRQ_EXCHANGE": mrq_settings.exchange,
        "MRQ_SERVICE_NAME": service,
    }

    async with run_module(tmp_path, module, env) as running:
        await running.wait_line("serving services=")
        async with Client(mrq_settings.broker_url, exchange=mrq_settings.exchange) as client:
            reply = await client.call(f"{service}.echo", "hi", timeout=10)
        running.process.send_signal(signal.SIGINT)
        exit_code = await running.wait_exit()

    assert reply == {"service": service, "body": "hi"}
    assert exit_code == 0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_run_with_bad_setting_fails_with_reason(
    mrq_settings: SettingsModel, tmp_path: Path, unique: str, jobs_module: str
) -> None:
    env = {**jobs_env(mrq_settings, tmp_path, f"jobs{unique}", 0), "MRQ_PREFETCH": "0"}

    async with run_module(tmp_path, jobs_module, env) as running:
        exit_code = await running.wait_exit()
        line = await running.wait_line("sdk.errors.SettingsError: ")

    assert exit_code != 0
    assert "invalid setting prefetch from MRQ_PREFETCH='0'" in line
