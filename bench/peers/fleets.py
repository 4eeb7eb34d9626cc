"""The supervisors under test, each running N copies of one child: configure, start, stop, clean up.

A launcher writes the configuration of one supervisor and returns its command
line. `run_fleet` starts it with its output in files and yields the running
`Fleet`. Afterwards it stops the supervisor the supervisor's own way and
kills what is left of it. Then it kills every process that still carries the
fleet's marker variable, which every supervisor passes on to its children.

The variants are mrq-supervisor running the mrq worker (`mrq`) or the plain
child as a `command` program (`mrq_child`), PM2, supervisord in the
foreground (`-n`), and circusd. PM2 runs in `--no-daemon` mode: its God
daemon runs inside the process that we start, so it stays our child. Every
peer runs with its default restart settings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import anyio
import psutil
from anyio.abc import Process
from loguru import logger

from bench.peers.child import PARAMS_VARIABLE
from bench.peers.install import PEERS_DIR, PeerTools
from sdk import names

MARKER_VARIABLE = "BENCH_SUPERVISORS_RUN"
CHILD_SCRIPT = Path(__file__).with_name("child.py")
WORKER_TARGET = "bench.peers.mrq_service"
NODE = "bench"
WORKER_SERVICE = "bench-worker"
CHILD_SERVICE = "bench-child"
CHILD_DEADLINE_S = 60.0
SHUTDOWN_TIMEOUT_S = 60.0
KILL_WAIT_S = 10.0
SWEEP_WAIT_S = 15.0
SWEEP_POLL_S = 0.2
# A Unix socket path has at most 107 bytes on Linux, and PM2 puts its sockets into PM2_HOME.
MAX_SOCKET_PATH = 100
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_MISSES = 3


@dataclass(frozen=True)
class FleetSpec:
    """One start of a supervisor: how many children, where its files go, which broker and names."""

    replicas: int
    folder: Path
    broker_url: str
    exchange: str
    marker: str
    python: str
    repo: Path
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_misses: int = HEARTBEAT_MISSES
    stop_timeout_s: float = 10.0

    @property
    def control_exchange(self) -> str:
        return names.control_exchange(self.exchange)


@dataclass
class Fleet:
    """A started supervisor: the process we spawned and the moment just before its exec."""

    launcher: Launcher
    spec: FleetSpec
    process: Process
    started_s: float

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr_path(self) -> Path:
        return self.spec.folder / "stderr.log"

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


class Launcher(ABC):
    """How to configure, start and stop one kind of supervisor."""

    key: str

    @property
    def ready_prefix(self) -> str:
        """The routing-key prefix of the message that announces a ready child."""
        return f"ready.{self.key}"

    @abstractmethod
    def prepare(self, spec: FleetSpec) -> list[str]:
        """Write the configuration into `spec.folder`; return the command line of the supervisor."""

    def env(self, spec: FleetSpec) -> dict[str, str]:
        """Return the supervisor's environment: ours without MRQ_*, the child's parameters, the marker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MRQ_")}
        env[PARAMS_VARIABLE] = json.dumps(self.child_params(spec))
        env[MARKER_VARIABLE] = spec.marker
        return env

    def child_params(self, spec: FleetSpec) -> dict[str, object]:
        return {
            "broker_url": spec.broker_url,
            "exchange": spec.control_exchange,
            "routing_key": self.ready_prefix,
            "deadline_s": CHILD_DEADLINE_S,
        }

    def child_argv(self, spec: FleetSpec) -> list[str]:
        return [spec.python, str(CHILD_SCRIPT)]

    async def shutdown(self, fleet: Fleet) -> None:
        """Ask the supervisor to stop its children and exit; `run_fleet` waits for the exit."""
        with suppress(ProcessLookupError):
            fleet.process.send_signal(signal.SIGTERM)

    def cleanup(self, spec: FleetSpec) -> None:  # noqa: B027 (an optional hook)
        """Remove what the supervisor left outside `spec.folder`."""


class MrqLauncher(Launcher):
    """mrq-supervisor, with the mrq worker (`worker=True`) or with the plain child as a program."""

    def __init__(self, *, worker: bool) -> None:
        self.worker = worker
        self.key = "mrq" if worker else "mrq_child"

    @property
    def node(self) -> str:
        # A node name of its own: two supervisors of one node name on one broker reject each other.
        return f"{NODE}-{self.key.replace('_', '-')}"

    @property
    def ready_prefix(self) -> str:
        if self.worker:
            return f"heartbeat.{self.node}.{WORKER_SERVICE}."
        return super().ready_prefix

    @property
    def service(self) -> str:
        return WORKER_SERVICE if self.worker else CHILD_SERVICE

    def prepare(self, spec: FleetSpec) -> list[str]:
        path = spec.folder / "supervisor.toml"
        path.write_text(self._config(spec))
        executable = Path(spec.python).with_name("mrq-supervisor")
        return [str(executable), "start", "-c", str(path)]

    def _config(self, spec: FleetSpec) -> str:
        settings = {
            "node": self.node,
            "broker": spec.broker_url,
            "exchange": spec.exchange,
            "state_dir": str(spec.folder / "state"),
            "heartbeat_interval_s": spec.heartbeat_interval_s,
            "heartbeat_misses": spec.heartbeat_misses,
            "dashboard": "off",
        }
        service: dict[str, object] = {
            "replicas": spec.replicas,
            "cwd": str(spec.repo),
            # Enough restarts for every kill; the first restart after a stable run is immediate.
            "max_restarts": 100_000,
            "restart_window_s": 60,
            "stable_after_s": 1.0,
            "stop_timeout_s": spec.stop_timeout_s,
        }
        if self.worker:
            service.update({"module": WORKER_TARGET, "python": spec.python})
        else:
            service["command"] = self.child_argv(spec)
        lines = [
            "[supervisor]",
            *_toml_pairs(settings),
            "",
            f"[services.{self.service}]",
            *_toml_pairs(service),
        ]
        return "\n".join(lines) + "\n"


class Pm2Launcher(Launcher):
    """PM2 with its God daemon inside the started process (`pm2 start --no-daemon`)."""

    key = "pm2"

    def __init__(self, tools: PeerTools) -> None:
        self.pm2 = tools.pm2

    def home(self, spec: FleetSpec) -> Path:
        home = PEERS_DIR / f"pm2-home-{spec.marker}-{spec.folder.name}"
        return home if len(str(home / "rpc.sock")) <= MAX_SOCKET_PATH else spec.folder / "pm2-home"

    def prepare(self, spec: FleetSpec) -> list[str]:
        home = self.home(spec)
        home.mkdir(parents=True, exist_ok=True)
        # PM2 reports its installation to its vendor unless this file exists.
        (home / "touch").write_text(str(int(time.time() * 1000)))
        log = str(spec.folder / "children.log")
        app = {
            "name": "child",
            "script": spec.python,
            "args": [str(CHILD_SCRIPT)],
            "interpreter": "none",
            "exec_mode": "fork",
            "instances": spec.replicas,
            "autorestart": True,
            "vizion": False,
            "out_file": log,
            "error_file": log,
            "env": {PARAMS_VARIABLE: json.dumps(self.child_params(spec)), MARKER_VARIABLE: spec.marker},
        }
        path = spec.folder / "ecosystem.json"
        path.write_text(json.dumps({"apps": [app]}, indent=2))
        return [str(self.pm2), "start", str(path), "--no-daemon"]

    def env(self, spec: FleetSpec) -> dict[str, str]:
        env = super().env(spec)
        env.update(
            {
                "PM2_HOME": str(self.home(spec)),
                "PM2_DISABLE_VERSION_CHECK": "true",
                "PM2_DISCRETE_MODE": "true",
            }
        )
        return env

    async def shutdown(self, fleet: Fleet) -> None:
        # `pm2 kill` stops every app through the daemon's socket, then the daemon exits.
        with anyio.move_on_after(SHUTDOWN_TIMEOUT_S):
            await anyio.run_process([str(self.pm2), "kill"], env=self.env(fleet.spec), check=False)

    def cleanup(self, spec: FleetSpec) -> None:
        home = self.home(spec)
        if home.is_relative_to(PEERS_DIR):
            shutil.rmtree(home, ignore_errors=True)


class SupervisordLauncher(Launcher):
    """supervisord in the foreground, one `[program]` with `numprocs` copies."""

    key = "supervisord"

    def __init__(self, tools: PeerTools) -> None:
        self.supervisord = tools.supervisord

    def prepare(self, spec: FleetSpec) -> list[str]:
        folder = spec.folder
        # NOTE: paths go into the file unquoted, so a path with a space or a `%` breaks this configuration.
        command = " ".join(self.child_argv(spec))
        text = f"""[supervisord]
nodaemon=true
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
childlogdir={folder}

[program:child]
command={command}
process_name=%(program_name)s_%(process_num)03d
numprocs={spec.replicas}
autorestart=true
redirect_stderr=true
stdout_logfile={folder}/child_%(process_num)03d.log
"""
        path = folder / "supervisord.conf"
        path.write_text(text)
        return [str(self.supervisord), "-n", "-c", str(path)]

    def env(self, spec: FleetSpec) -> dict[str, str]:
        # supervisord's package is named `supervisor` too: with this repository on
        # PYTHONPATH (scripts/bench puts it there), ours would shadow it.
        env = super().env(spec)
        env.pop("PYTHONPATH", None)
        return env


class CircusLauncher(Launcher):
    """circusd with one watcher of `numprocesses` copies; its ZeroMQ endpoints are Unix sockets."""

    key = "circus"

    def __init__(self, tools: PeerTools) -> None:
        self.circusd = tools.circusd

    def prepare(self, spec: FleetSpec) -> list[str]:
        folder = spec.folder
        python, script = self.child_argv(spec)
        log = folder / "children.log"
        text = f"""[circus]
endpoint = ipc://{folder}/endpoint.sock
pubsub_endpoint = ipc://{folder}/pubsub.sock
stats_endpoint = ipc://{folder}/stats.sock
statsd = false

[watcher:child]
cmd = {python}
args = {script}
numprocesses = {spec.replicas}
copy_env = true
stdout_stream.class = FileStream
stdout_stream.filename = {log}
stderr_stream.class = FileStream
stderr_stream.filename = {log}
"""
        path = folder / "circus.ini"
        path.write_text(text)
        return [str(self.circusd), "--log-output", str(folder / "circusd.log"), str(path)]


def _toml_pairs(values: dict[str, object]) -> list[str]:
    # JSON strings, numbers and arrays of strings are valid TOML values.
    return [f"{key} = {json.dumps(value)}" for key, value in values.items()]


@asynccontextmanager
async def run_fleet(launcher: Launcher, spec: FleetSpec) -> AsyncIterator[Fleet]:
    """Start the supervisor of `launcher` as `spec` describes; afterwards stop it and all it started."""
    spec.folder.mkdir(parents=True, exist_ok=True)
    argv = launcher.prepare(spec)
    with (spec.folder / "stdout.log").open("wb") as stdout, (spec.folder / "stderr.log").open("wb") as stderr:
        started_s = time.monotonic()
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=spec.folder,
            env=launcher.env(spec),
        )
    fleet = Fleet(launcher, spec, process, started_s)
    logger.info(
        "fleet started variant={} pid={} replicas={} folder={}",
        launcher.key,
        process.pid,
        spec.replicas,
        spec.folder,
    )
    try:
        yield fleet
    finally:
        with anyio.CancelScope(shield=True):
            await _stop_fleet(fleet)


async def _stop_fleet(fleet: Fleet) -> None:
    process = fleet.process
    if process.returncode is None:
        await fleet.launcher.shutdown(fleet)
        with anyio.move_on_after(SHUTDOWN_TIMEOUT_S):
            await process.wait()
    if process.returncode is None:
        logger.warning("fleet did not stop, killing it variant={} pid={}", fleet.launcher.key, process.pid)
        with suppress(ProcessLookupError):
            process.kill()
        with anyio.move_on_after(KILL_WAIT_S):
            await process.wait()
    await process.aclose()
    leftovers = await sweep(fleet.spec.marker)
    if leftovers:
        logger.warning("fleet left processes, killed them variant={} pids={}", fleet.launcher.key, leftovers)
    fleet.launcher.cleanup(fleet.spec)
    logger.info("fleet stopped variant={} exit_code={}", fleet.launcher.key, process.returncode)


async def sweep(marker: str) -> list[int]:
    """Kill every live process that carries the marker; wait until they are gone; return their pids."""
    found = await anyio.to_thread.run_sync(marked_processes, marker)
    for pid in found:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with anyio.move_on_after(SWEEP_WAIT_S):
        # Polling: nothing notifies the exit of a process that is not our child.
        while await anyio.to_thread.run_sync(marked_processes, marker):  # noqa: ASYNC110
            await anyio.sleep(SWEEP_POLL_S)
    return found


def marked_processes(marker: str) -> list[int]:
    """Return the pids of the live (not zombie) processes whose environment contains the marker."""
    wanted = f"{MARKER_VARIABLE}={marker}".encode()
    pids = []
    for process in psutil.process_iter(["status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            pids.append(process.pid)
    return pids
