"""Helpers for the supervisor tests: real `mrq-supervisor start` runs, observed from outside.

`SupKit` writes service modules and a supervisor.toml into a test's tmp folder and starts
the supervisor with its stdout and stderr in files. When the test ends, it stops every
supervisor it started and kills every process that carries the state folder's marker.
`ControlWatcher` consumes the control exchange: the supervisor's events and the
workers' heartbeats. The registry is read with `supervisor.registry.read_snapshot`,
real pids with psutil.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import psutil
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from sdk import names
from sdk.wire import Event, Heartbeat, decode
from supervisor.node import ORPHAN_MARKER
from supervisor.registry import Snapshot, read_snapshot, registry_path

PYTHON = sys.executable
SUPERVISOR = str(Path(sys.executable).with_name("mrq-supervisor"))
POLL_S = 0.05
JOURNAL_NAME = "journal.log"
SUPERVISOR_STOP_TIMEOUT_S = 20.0

# A healthy service with one route. Every test service takes its name from
# MRQ_SERVICE_NAME, which the supervisor sets to the name in supervisor.toml.
NORMAL_MODULE = """
import os

from sdk import Service, route


class Normal(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    @route("echo")
    async def echo(self, body: object) -> object:
        return body
"""

# Exits with code 3 before it consumes anything.
CRASH_MODULE = """
import os

from sdk import Service, route


class Crash(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    async def on_start(self) -> None:
        raise SystemExit(3)

    @route("echo")
    async def echo(self, body: object) -> object:
        return body
"""

# The worker cannot import it, so it exits with code 78 (configuration error).
BROKEN_MODULE = """
import module_that_does_not_exist  # noqa: F401
"""

# Handlers append "<event> <pid> <unix time> <body>" to the file named by SUPTEST_JOURNAL.
WORK_MODULE = """
import asyncio
import os
import time
from pathlib import Path

from sdk import Service, route

JOURNAL = os.environ["SUPTEST_JOURNAL"]


def record(event: str, body: object) -> None:
    with open(JOURNAL, "a") as journal:
        journal.write(f"{event} {os.getpid()} {time.time()} {body}\\n")


class Work(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    @route("hang")
    async def hang(self, flag: str) -> None:
        # Blocks the event loop, so no heartbeat leaves the process. Only the first
        # delivery hangs: the copy redelivered to the next process finds the flag file.
        if Path(flag).exists():
            record("hang-skipped", flag)
            return
        Path(flag).touch()
        record("hang", flag)
        time.sleep(3600)

    @route("slow")
    async def slow(self, seconds: float) -> None:
        record("start", seconds)
        await asyncio.sleep(seconds)
        record("done", seconds)
"""

# Takes SUPTEST_HOG_MB megabytes, from one second after its start on, and keeps them.
HOG_MODULE = """
import asyncio
import os
import time

from sdk import Service, route

JOURNAL = os.environ["SUPTEST_JOURNAL"]
HOG_MB = int(os.environ.get("SUPTEST_HOG_MB", "300"))


class Hog(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    async def on_start(self) -> None:
        self.hoard: list[bytes] = []
        self.grower = asyncio.get_running_loop().create_task(self.grow())

    async def grow(self) -> None:
        await asyncio.sleep(1.0)
        # In 10 MB steps, so that the event loop, and with it the heartbeats, keeps running.
        for _ in range(HOG_MB // 10):
            self.hoard.append(b"x" * (10 * 1024 * 1024))
            await asyncio.sleep(0.01)
        with open(JOURNAL, "a") as journal:
            journal.write(f"hog {os.getpid()} {time.time()} {HOG_MB}\\n")

    @route("echo")
    async def echo(self, body: object) -> object:
        return body
"""

# Writes one line to stdout and one to stderr at start, then "tick <n>" on stdout every 0.1 s.
TICKER_MODULE = """
import asyncio
import os
import sys

from sdk import Service, route


class Ticker(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    async def on_start(self) -> None:
        print(f"ticker stdout pid={os.getpid()}", flush=True)
        print(f"ticker stderr pid={os.getpid()}", file=sys.stderr, flush=True)
        self.ticking = asyncio.get_running_loop().create_task(self.tick())

    async def tick(self) -> None:
        count = 0
        while True:
            count += 1
            print(f"tick {count}", flush=True)
            await asyncio.sleep(0.1)

    @route("echo")
    async def echo(self, body: object) -> object:
        return body
"""

# Writes argv[1] lines of 1000 bytes to stdout every 0.1 s, forever.
SPEW_SCRIPT = """
import sys
import time

chunk = ("x" * 999 + "\\n") * int(sys.argv[1])
while True:
    sys.stdout.write(chunk)
    sys.stdout.flush()
    time.sleep(0.1)
"""

# Becomes a child subreaper, runs argv[2:] as its child, and writes the child's pid, then its
# exit code, into the folder argv[1]. Orphans of the supervisor are reparented to this process, which reaps
# them: PID 1 of the test machines does not, so they would stay zombies.
REAPER_SCRIPT = """
import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
folder = sys.argv[1]


def write(name, text):
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.rename(path + ".tmp", path)


child = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
write("supervisor.pid", str(child))
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        write("supervisor.exit", str(os.waitstatus_to_exitcode(status)))
"""


def toml_value(value: Any) -> str:
    """Render a value of supervisor.toml: a string, number, boolean, list or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def render_config(settings: Mapping[str, Any], services: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["[supervisor]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for name, service in services.items():
        lines += ["", f"[services.{name}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in service.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JournalEntry:
    """One line that a handler of a test service appended to the journal."""

    event: str
    pid: int
    time: float
    body: str


@dataclass
class SupervisorRun:
    """A started `mrq-supervisor start`, directly or under the subreaper of REAPER_SCRIPT."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    reaper_folder: Path | None
    signalled_at: dict[str, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        if self.reaper_folder is None:
            return self.popen.pid
        return int((self.reaper_folder / "supervisor.pid").read_text())

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def exit_code(self) -> int | None:
        """Return the supervisor's exit code, or None while it runs."""
        if self.reaper_folder is None:
            return self.popen.poll()
        path = self.reaper_folder / "supervisor.exit"
        return int(path.read_text()) if path.exists() else None

    def send_signal(self, signum: int) -> None:
        if self.exit_code() is None:
            os.kill(self.pid, signum)
            self.signalled_at[signal.Signals(signum).name] = time.monotonic()

    async def wait_started(self, timeout_s: float = 20.0) -> None:
        """Wait until the subreaper has written the supervisor's pid. Without a subreaper, return at once."""
        if self.reaper_folder is None:
            return
        pid_path = self.reaper_folder / "supervisor.pid"
        if not await poll_until(pid_path.exists, timeout_s):
            raise AssertionError(f"the subreaper wrote no supervisor pid within {timeout_s:g} s")

    async def wait_for_log(self, fragment: str, timeout_s: float = 30.0) -> str:
        """Return the first stderr line that contains `fragment`, and fail if the supervisor exits first."""
        found: list[str] = []

        def logged() -> bool:
            found[:] = [line for line in self.stderr().splitlines() if fragment in line]
            return bool(found) or self.exit_code() is not None

        if await poll_until(logged, timeout_s) and found:
            return found[0]
        raise AssertionError(
            f"the supervisor logged no line containing {fragment!r} within {timeout_s:g} s "
            f"(exit code {self.exit_code()}); stderr:\n{self.stderr()[-6000:]}"
        )

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        if await poll_until(lambda: self.exit_code() is not None, timeout_s):
            code = self.exit_code()
            assert code is not None
            return code
        raise AssertionError(
            f"the supervisor did not exit within {timeout_s:g} s; stderr:\n{self.stderr()[-6000:]}"
        )


class SupKit:
    """One test's folder, broker names, supervisor runs and the processes to clean up."""

    def __init__(self, folder: Path, broker_url: str, unique: str) -> None:
        self.folder = folder
        self.broker_url = broker_url
        self.unique = unique
        self.exchange = f"t{unique}"
        self.node = f"n{unique}"
        self.state_dir = folder / "state"
        self.config_path = folder / "supervisor.toml"
        self.journal = folder / JOURNAL_NAME
        self.runs: list[SupervisorRun] = []
        self.extra_processes: list[subprocess.Popen[bytes]] = []

    @property
    def control_exchange(self) -> str:
        return names.control_exchange(self.exchange)

    def service(self, base: str) -> str:
        """Return a service name unique to this test, so that queues of other tests never mix in."""
        return f"{base}{self.unique}"

    def write_module(self, name: str, source: str) -> str:
        (self.folder / f"{name}.py").write_text(source)
        return name

    def write_config(self, services: Mapping[str, Mapping[str, Any]], **settings: Any) -> Path:
        """Write supervisor.toml: short intervals, this test's broker and names, the dashboard off.

        Each service gets stop_timeout_s = 2 and SUPTEST_JOURNAL in its env unless it sets them.
        """
        merged_settings: dict[str, Any] = {
            "node": self.node,
            "broker": self.broker_url,
            "exchange": self.exchange,
            "state_dir": "state",
            "heartbeat_interval_s": 0.2,
            "heartbeat_misses": 3,
            "start_timeout_s": 10,
            "dashboard": "off",
        }
        merged_settings.update(settings)
        merged_services: dict[str, dict[str, Any]] = {}
        for name, service in services.items():
            merged = {"stop_timeout_s": 2, **service}
            merged["env"] = {"SUPTEST_JOURNAL": str(self.journal), **service.get("env", {})}
            merged_services[name] = merged
        self.config_path.write_text(render_config(merged_settings, merged_services))
        return self.config_path

    async def start(self, *, reaper: bool = False) -> SupervisorRun:
        """Start `mrq-supervisor start -c supervisor.toml`, under a child subreaper with `reaper`.

        Use the subreaper when the test kills the supervisor, so that its orphaned instances
        are reaped when they exit.
        """
        run = await anyio.to_thread.run_sync(self._spawn, reaper)
        self.runs.append(run)
        await run.wait_started()
        return run

    def _spawn(self, reaper: bool) -> SupervisorRun:
        number = len(self.runs)
        stdout_path = self.folder / f"supervisor-{number}.stdout"
        stderr_path = self.folder / f"supervisor-{number}.stderr"
        argv = [SUPERVISOR, "start", "-c", str(self.config_path)]
        reaper_folder = None
        if reaper:
            reaper_folder = self.folder / f"reaper-{number}"
            reaper_folder.mkdir()
            argv = [PYTHON, "-c", REAPER_SCRIPT, str(reaper_folder), *argv]
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            popen = subprocess.Popen(
                argv,
                env=_clean_environment(),
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        return SupervisorRun(popen, stdout_path, stderr_path, reaper_folder)

    def start_stranger(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a process that no supervisor started. It is killed when the test ends."""
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.extra_processes.append(popen)
        return popen

    def watcher(self, broker_url: str | None = None) -> ControlWatcher:
        return ControlWatcher(broker_url or self.broker_url, self.control_exchange)

    def journal_entries(self) -> list[JournalEntry]:
        if not self.journal.exists():
            return []
        entries = []
        for line in self.journal.read_text().splitlines():
            event, pid, when, body = line.split(" ", 3)
            entries.append(JournalEntry(event, int(pid), float(when), body))
        return entries

    async def wait_for_journal(
        self, predicate: Callable[[list[JournalEntry]], bool], what: str, timeout_s: float = 20.0
    ) -> list[JournalEntry]:
        if await poll_until(lambda: predicate(self.journal_entries()), timeout_s):
            return self.journal_entries()
        raise AssertionError(f"journal shows no {what} within {timeout_s:g} s: {self.journal_entries()}")

    async def wait_for_registry(
        self, predicate: Callable[[Snapshot], bool], what: str, timeout_s: float = 10.0
    ) -> Snapshot:
        """Return the first registry snapshot that matches: the supervisor writes it shortly after events."""
        path = registry_path(self.state_dir)
        snapshots: list[Snapshot] = []

        def matches() -> bool:
            snapshots[:] = [read_snapshot(path, event_limit=1000)]
            return predicate(snapshots[0])

        with anyio.move_on_after(timeout_s):
            while True:
                if await anyio.to_thread.run_sync(matches):
                    return snapshots[0]
                await anyio.sleep(POLL_S)
        raise AssertionError(f"registry shows no {what} within {timeout_s:g} s: {snapshots[-1:]}")

    async def marked_processes(self) -> list[psutil.Process]:
        """Return the live processes whose environment names this kit's state folder."""
        return await anyio.to_thread.run_sync(find_marked, self.state_dir)

    def cleanup(self) -> None:
        """Stop every supervisor (SIGTERM, then SIGKILL), then kill whatever carries the marker."""
        for run in self.runs:
            _stop_supervisor(run)
        for process in find_marked(self.state_dir):
            _kill_group(process.pid)
        for popen in self.extra_processes:
            _kill_group(popen.pid)
            popen.wait(timeout=30)
        for run in self.runs:
            try:
                run.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.popen.kill()
                run.popen.wait(timeout=30)


@contextmanager
def supervisor_kit(folder: Path, broker_url: str, unique: str) -> Iterator[SupKit]:
    kit = SupKit(folder, broker_url, unique)
    try:
        yield kit
    finally:
        kit.cleanup()


async def poll_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Check `predicate` every POLL_S until it is true, and return False when `timeout_s` passes first.

    For state outside this process (files, other processes), which sends no notification.
    """
    with anyio.move_on_after(timeout_s):
        while True:
            if predicate():
                return True
            await anyio.sleep(POLL_S)
    return predicate()


def _clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("MRQ_")}


def _stop_supervisor(run: SupervisorRun) -> None:
    if run.exit_code() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(run.pid, signal.SIGTERM)
    deadline = time.monotonic() + SUPERVISOR_STOP_TIMEOUT_S
    while run.exit_code() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if run.exit_code() is None:
        with suppress(ProcessLookupError):
            os.kill(run.pid, signal.SIGKILL)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group that `pid` leads, or the process alone when it leads none."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def find_marked(state_dir: Path) -> list[psutil.Process]:
    """Return the live processes whose environment carries the marker of `state_dir`."""
    wanted = {str(state_dir), str(state_dir.resolve())}
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(ORPHAN_MARKER) in wanted and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def process_status(pid: int) -> str | None:
    """Return the psutil status of `pid` ("zombie" included), or None when no process has it."""
    try:
        return str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return None


def is_running(pid: int) -> bool:
    status = process_status(pid)
    return status is not None and status != psutil.STATUS_ZOMBIE


class ControlWatcher:
    """Records the supervisor events and worker heartbeats published on `<exchange>.control`."""

    def __init__(self, broker_url: str, control_exchange: str) -> None:
        self.broker_url = broker_url
        self.control_exchange = control_exchange
        self.events: list[Event] = []
        self.heartbeats: list[tuple[float, Heartbeat]] = []
        self._connection: AbstractConnection | None = None
        self._changed = anyio.Event()

    async def __aenter__(self) -> ControlWatcher:
        with anyio.fail_after(20):
            self._connection = await aio_pika.connect(self.broker_url)
            channel = await self._connection.channel()
            exchange = await channel.declare_exchange(
                self.control_exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in ("event.#", "heartbeat.#"):
                await queue.bind(exchange, pattern)
            await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None and not self._connection.is_closed:
            with anyio.move_on_after(10, shield=True), suppress(Exception):
                await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        decoded = decode(message.body)
        if isinstance(decoded, Event):
            self.events.append(decoded)
        elif isinstance(decoded, Heartbeat):
            self.heartbeats.append((time.monotonic(), decoded))
        self._changed.set()
        self._changed = anyio.Event()

    def events_of(
        self, kind: str, service: str | None = None, instance: int | None = None, since: int = 0
    ) -> list[Event]:
        """Return the events of `kind` (of `service` and `instance`) from position `since` on."""
        return [
            event
            for event in self.events[since:]
            if event.kind == kind
            and (service is None or event.service == service)
            and (instance is None or event.instance == instance)
        ]

    def mark(self) -> int:
        """Return the position of the next event, for `since=` of later queries."""
        return len(self.events)

    def heartbeat_pids(self, service: str, since_mono: float = 0.0) -> set[int]:
        return {beat.pid for at, beat in self.heartbeats if beat.service == service and at >= since_mono}

    async def wait_until(self, predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        """Wait until `predicate` is true, checking it after every message received."""
        with anyio.move_on_after(timeout_s):
            while True:
                changed = self._changed
                if predicate():
                    return
                await changed.wait()
        raise AssertionError(f"{what}: not seen within {timeout_s:g} s; events:\n{self.describe()}")

    async def wait_event(
        self,
        kind: str,
        service: str | None = None,
        instance: int | None = None,
        *,
        since: int = 0,
        where: Callable[[Event], bool] = lambda _event: True,
        timeout_s: float = 20.0,
    ) -> Event:
        """Return the first event of `kind` from position `since` on that matches `where`."""
        found: list[Event] = []

        def seen() -> bool:
            found[:] = [e for e in self.events_of(kind, service, instance, since) if where(e)]
            return bool(found)

        await self.wait_until(seen, f"event {kind} of {service}:{instance}", timeout_s)
        return found[0]

    def describe(self, last: int = 40) -> str:
        return "\n".join(
            f"  {e.kind} {e.service}:{e.instance} {json.dumps(e.data, default=str)}"
            for e in self.events[-last:]
        )
