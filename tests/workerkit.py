"""Helpers for the worker tests: real `python -m worker` processes and a control-plane observer.

`WorkerKit` writes service modules into a test's directory, starts workers
with their stdout and stderr in files, and kills whatever is still running
when the test ends. `ControlObserver` is a plain aio-pika consumer of the
control exchange: it records hellos, heartbeats and goodbyes, sends signed
commands and inspects queues.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import anyio
import psutil
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from sdk import names, signing
from sdk.wire import Goodbye, Heartbeat, Hello, Reply, decode

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]
LOG_POLL_S = 0.05
JOURNAL_NAME = "journal.log"

M = TypeVar("M", Hello, Heartbeat, Goodbye)

# A service for the worker tests. Its service name comes from MRQ_SERVICE_NAME and each
# handler appends "<event> <pid> <body>" to the file named by WORKER_TEST_JOURNAL.
SERVICE_MODULE = """
import asyncio
import os
import time

from sdk import microservice

JOURNAL = os.environ["WORKER_TEST_JOURNAL"]
WORK_S = float(os.environ.get("WORKER_TEST_WORK_S", "0"))


def record(event, body):
    with open(JOURNAL, "a") as journal:
        journal.write(f"{event} {os.getpid()} {body}\\n")


@microservice("echo")
async def echo(body):
    return body


@microservice("work")
async def work(body):
    record("start", body)
    await asyncio.sleep(WORK_S)
    record("done", body)


@microservice("block")
def block(body):
    # A plain function runs on the event loop, so this sleep blocks the loop.
    record("block", body)
    time.sleep(float(body))
"""

# Runs its arguments as a child and reaps every process reparented to it, so that an
# orphaned worker gets a parent that reaps it (PID 1 in some containers does not).
REAPER_SCRIPT = """
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@dataclass(frozen=True)
class JournalEntry:
    """One line that a handler of SERVICE_MODULE appended to the journal."""

    event: str
    pid: int
    body: str


@dataclass
class WorkerProcess:
    """A started `python -m worker`, with its stderr in a file."""

    popen: subprocess.Popen[bytes]
    stderr_path: Path
    label: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr_text().splitlines() if line.strip()]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    async def wait_for_log(self, fragment: str, timeout_s: float = 20.0) -> str:
        """Return the first stderr line containing `fragment`; fail if the worker exits first."""
        with anyio.move_on_after(timeout_s):
            while True:
                for line in self.stderr_lines():
                    if fragment in line:
                        return line
                if not self.alive():
                    break
                await anyio.sleep(LOG_POLL_S)
        raise AssertionError(
            f"worker {self.label} logged no line containing {fragment!r} within {timeout_s:g} s "
            f"(exit code {self.popen.poll()}); stderr:\n{self.stderr_text()[-4000:]}"
        )

    async def wait_exit(self, timeout_s: float = 20.0) -> int:
        """Wait for the worker to exit and return its exit code (negative: killed by that signal)."""
        try:
            code: int = await anyio.to_thread.run_sync(self.popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.label} did not exit within {timeout_s:g} s; stderr:\n"
                f"{self.stderr_text()[-4000:]}"
            ) from None
        return code


class WorkerKit:
    """Starts workers of one test, all on the test's vhost and exchange, and kills the leftovers."""

    def __init__(self, directory: Path, broker_url: str, exchange: str, unique: str) -> None:
        self.directory = directory
        self.broker_url = broker_url
        self.exchange = exchange
        self.node = f"node{unique}"
        self.service = f"svc{unique}"
        self.cluster_key = f"key-{unique}".encode()
        self.journal = directory / JOURNAL_NAME
        self.processes: list[subprocess.Popen[bytes]] = []
        self.write_module("workersvc", SERVICE_MODULE)

    def write_module(self, name: str, source: str) -> str:
        (self.directory / f"{name}.py").write_text(source)
        return name

    def environment(self, instance: int = 0, /, **overrides: str) -> dict[str, str]:
        """Return the environment of a worker: this test's broker, names and a 0.2 s heartbeat."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("MRQ_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.directory), str(REPO)]),
            PYTHONUNBUFFERED="1",
            WORKER_TEST_JOURNAL=str(self.journal),
            MRQ_TARGET="workersvc",
            MRQ_BROKER_URL=self.broker_url,
            MRQ_EXCHANGE=self.exchange,
            MRQ_NODE=self.node,
            MRQ_SERVICE_NAME=self.service,
            MRQ_INSTANCE=str(instance),
            MRQ_HEARTBEAT_INTERVAL_S="0.2",
            MRQ_HEARTBEAT_MISSES="3",
            MRQ_STOP_TIMEOUT_S="10",
            MRQ_CLUSTER_KEY=self.cluster_key.decode(),
        )
        env.update(overrides)
        return {key: value for key, value in env.items() if value != ""}

    def start(self, instance: int = 0, /, **overrides: str) -> WorkerProcess:
        """Start `python -m worker`; an override set to "" removes that variable."""
        label = f"{self.service}.{instance}"
        stderr_path = self.directory / f"worker-{instance}-{len(self.processes)}.stderr"
        with open(stderr_path, "wb") as stderr, open(stderr_path.with_suffix(".stdout"), "wb") as stdout:
            popen = subprocess.Popen(
                [PYTHON, "-m", "worker"],
                env=self.environment(instance, **overrides),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        self.processes.append(popen)
        return WorkerProcess(popen, stderr_path, label)

    def start_reaper(self, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Run `argv` under a child subreaper, which adopts and reaps the orphans of `argv`."""
        popen = subprocess.Popen(
            [PYTHON, "-c", REAPER_SCRIPT, *argv], env=dict(env), cwd=self.directory, stdin=subprocess.DEVNULL
        )
        self.processes.append(popen)
        return popen

    def journal_entries(self) -> list[JournalEntry]:
        if not self.journal.exists():
            return []
        entries = []
        for line in self.journal.read_text().splitlines():
            event, pid, body = line.split(" ", 2)
            entries.append(JournalEntry(event, int(pid), body))
        return entries

    async def wait_for_journal(
        self, predicate: Callable[[list[JournalEntry]], bool], what: str, timeout_s: float = 20.0
    ) -> list[JournalEntry]:
        """Return the journal once `predicate` holds for it; `what` names the wait in the failure."""
        with anyio.move_on_after(timeout_s):
            while True:
                entries = self.journal_entries()
                if predicate(entries):
                    return entries
                await anyio.sleep(LOG_POLL_S)
        raise AssertionError(f"journal shows no {what} within {timeout_s:g} s: {self.journal_entries()}")

    def kill_all(self) -> None:
        """SIGKILL every started process and its descendants, then reap the started ones."""
        for popen in self.processes:
            # The pid of a reaped process may belong to another process by now.
            if popen.poll() is None:
                kill_tree(popen.pid)
        for popen in self.processes:
            popen.wait(timeout=30)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant of it that is still running."""
    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


@contextmanager
def worker_kit(directory: Path, broker_url: str, unique: str) -> Iterator[WorkerKit]:
    kit = WorkerKit(directory, broker_url, f"t{unique}", unique)
    try:
        yield kit
    finally:
        kit.kill_all()


@dataclass(frozen=True)
class Received:
    """A control message as the observer received it."""

    routing_key: str
    message: Any
    received_at: float
    expiration_s: float | None


@dataclass
class ControlObserver:
    """Consumes everything on `<exchange>.control` and sends signed commands to workers."""

    broker_url: str
    exchange: str
    key: bytes
    received: list[Received] = field(default_factory=list)
    replies: dict[str, AbstractIncomingMessage] = field(default_factory=dict)
    _connection: AbstractConnection | None = None
    _channel: AbstractChannel | None = None
    _reply_queue: AbstractQueue | None = None
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def control_exchange(self) -> str:
        return names.control_exchange(self.exchange)

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "the observer is not open"
        return self._channel

    async def __aenter__(self) -> ControlObserver:
        with anyio.fail_after(15):
            self._connection = await aio_pika.connect(self.broker_url)
            self._channel = await self._connection.channel()
            exchange = await self._channel.declare_exchange(
                self.control_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in ("hello.#", "heartbeat.#", "goodbye.#"):
                await queue.bind(exchange, pattern)
            await queue.consume(self._on_control, no_ack=True)
            self._reply_queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            with anyio.move_on_after(10, shield=True):
                await self._connection.close()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        decoded = decode(message.body)
        expiration_s = float(message.expiration) if isinstance(message.expiration, int | float) else None
        received = Received(message.routing_key or "", decoded, time.monotonic(), expiration_s)
        self.received.append(received)
        self._notify()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        self.replies[message.correlation_id or ""] = message
        self._notify()

    def of_type(self, kind: type[M], pid: int | None = None, since: float = 0.0) -> list[M]:
        """Return the messages of `kind` (from `pid`), received at or after monotonic time `since`."""
        return [r.message for r in self.records(kind, pid, since)]

    def records(self, kind: type[Any], pid: int | None = None, since: float = 0.0) -> list[Received]:
        return [
            r
            for r in self.received
            if isinstance(r.message, kind)
            and (pid is None or r.message.pid == pid)
            and r.received_at >= since
        ]

    async def wait_for(
        self,
        kind: type[M],
        predicate: Callable[[M], bool] = lambda _message: True,
        *,
        pid: int | None = None,
        since: float = 0.0,
        timeout_s: float = 20.0,
    ) -> M:
        """Return the first message of `kind` matching `predicate`, waiting up to `timeout_s`."""
        with anyio.move_on_after(timeout_s):
            while True:
                changed = self._changed
                for message in self.of_type(kind, pid, since):
                    if predicate(message):
                        return message
                await changed.wait()
        seen = [type(r.message).__name__ for r in self.received]
        raise AssertionError(
            f"no matching {kind.__name__} (pid {pid}) within {timeout_s:g} s; received: {seen[-20:]}"
        )

    async def wait_for_count(
        self,
        kind: type[M],
        count: int,
        *,
        pid: int | None = None,
        since: float = 0.0,
        timeout_s: float = 20.0,
    ) -> list[M]:
        """Wait until at least `count` messages of `kind` have arrived and return them."""
        with anyio.move_on_after(timeout_s):
            while True:
                changed = self._changed
                found = self.of_type(kind, pid, since)
                if len(found) >= count:
                    return found
                await changed.wait()
        raise AssertionError(
            f"{len(self.of_type(kind, pid, since))} {kind.__name__} messages (pid {pid}) "
            f"within {timeout_s:g} s; expected at least {count}"
        )

    # Commands.

    def signed_command(
        self,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        target: str | None,
        key: bytes | None = None,
        **fields: Any,
    ) -> tuple[bytes, dict[str, Any]]:
        """Return the body and headers of a command for routing key `target`, signed with `key`.

        `key` defaults to the cluster key; `fields` replace fields of the command.
        """
        command = signing.make_command(name, args, sender="worker-tests", target=target)
        if fields:
            command = command.model_copy(update=fields)
        body = command.to_json()
        return body, signing.sign_headers(key or self.key, body)

    async def publish_command(
        self, routing_key: str, body: bytes, headers: Mapping[str, Any] | None = None
    ) -> str:
        """Publish a command with a reply queue and return its correlation id."""
        assert self._reply_queue is not None, "the observer is not open"
        correlation_id = os.urandom(8).hex()
        message = aio_pika.Message(
            body,
            headers=dict(headers) if headers else None,
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self._reply_queue.name,
        )
        exchange = await self.channel.get_exchange(self.control_exchange, ensure=False)
        with anyio.fail_after(10):
            await exchange.publish(message, routing_key)
        return correlation_id

    async def wait_reply(self, correlation_id: str, timeout_s: float = 20.0) -> Reply:
        """Return the verified reply to a command; fail when none arrives or its signature is bad."""
        with anyio.move_on_after(timeout_s):
            while correlation_id not in self.replies:
                await self._changed.wait()
        message = self.replies.get(correlation_id)
        assert message is not None, f"no reply to command {correlation_id} within {timeout_s:g} s"
        return signing.verify_reply(self.key, message.body, message.headers)

    async def command(self, routing_key: str, name: str, args: Mapping[str, Any] | None = None) -> Reply:
        body, headers = self.signed_command(name, args, target=routing_key)
        correlation_id = await self.publish_command(routing_key, body, headers)
        return await self.wait_reply(correlation_id)

    # Queues.

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """Return (messages ready, consumers) of an existing queue."""
        assert self._connection is not None, "the observer is not open"
        with anyio.fail_after(10):
            async with self._connection.channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                return result.message_count or 0, result.consumer_count or 0

    async def bind_idle_queue(self, routing_key: str) -> str:
        """Declare a queue bound to `routing_key` on the control exchange, without a consumer."""
        name = f"idle.{routing_key}.{os.urandom(3).hex()}"
        with anyio.fail_after(10):
            queue = await self.channel.declare_queue(name, exclusive=True)
            await queue.bind(self.control_exchange, routing_key)
        return name

    async def get_one(self, queue: str, timeout_s: float = 5.0) -> AbstractIncomingMessage | None:
        """Take one message from `queue` by basic.get, waiting up to `timeout_s` for one to appear."""
        with anyio.move_on_after(timeout_s):
            declared = await self.channel.get_queue(queue, ensure=False)
            while True:
                message = await declared.get(no_ack=True, fail=False)
                if message is not None:
                    return message
                await anyio.sleep(LOG_POLL_S)
        return None

    async def consume_for(self, queue: str, listen_s: float) -> list[AbstractIncomingMessage]:
        """Consume `queue` as a new consumer for `listen_s` and return (and ack) what arrives."""
        assert self._connection is not None, "the observer is not open"
        arrived: list[AbstractIncomingMessage] = []

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrived.append(message)
            await message.ack()

        with anyio.fail_after(listen_s + 10):
            async with self._connection.channel() as channel:
                declared = await channel.get_queue(queue, ensure=False)
                tag = await declared.consume(on_message)
                await anyio.sleep(listen_s)
                await declared.cancel(tag)
        return arrived


async def exchange_exists(broker_url: str, exchange: str) -> bool:
    """Tell whether `exchange` exists, by a passive declare that creates nothing."""
    with anyio.fail_after(15):
        connection = await aio_pika.connect(broker_url)
        try:
            channel = await connection.channel()
            try:
                await channel.declare_exchange(exchange, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return False
            return True
        finally:
            await connection.close()


def close_broker_connections(broker_url: str, pid: int) -> int:
    """Close the connections of process `pid` in the vhost of `broker_url` from the broker side.

    Return how many were closed. The worker names its connection "... pid=<pid>".
    """
    vhost = unquote(urlsplit(broker_url).path[1:]) or "/"
    rabbitmqctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    listing = subprocess.run(
        [rabbitmqctl, "list_connections", "-q", "--no-table-headers", "pid", "vhost", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    closed = 0
    for line in listing.stdout.splitlines():
        connection, connection_vhost, properties = line.split("\t", 2)
        if connection_vhost == vhost and f'pid={pid}"' in properties:
            subprocess.run(
                [rabbitmqctl, "close_connection", connection, "closed by a worker test"],
                capture_output=True,
                timeout=60,
                check=True,
            )
            closed += 1
    return closed
