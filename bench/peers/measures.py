"""The measures of the `supervisors` benchmark, each on fleets started for it alone.

Every measure returns samples: dicts with the variant (the launcher's key),
the measure's name and its value, plus context. Times are differences of
`time.monotonic()`, one clock for every process on Linux, so a child's own
timestamp (the hang record) can be compared with an arrival seen here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psutil
from loguru import logger

from bench.children import child_env
from bench.context import BenchContext, variant_order
from bench.peers.child import HANG_BODY, PARAMS_VARIABLE
from bench.peers.fleets import (
    CHILD_DEADLINE_S,
    CHILD_SCRIPT,
    MARKER_VARIABLE,
    WORKER_SERVICE,
    WORKER_TARGET,
    Fleet,
    FleetSpec,
    Launcher,
    MrqLauncher,
    run_fleet,
)
from bench.peers.profile import Profile, record
from bench.peers.watch import ControlWatch, Sighting
from bench.workers import WorkerSetup, worker_env

READY_TIMEOUT_S = 60.0
FLEET_READY_TIMEOUT_S = 240.0
RESTART_TIMEOUT_S = 60.0
HANG_EVENT_TIMEOUT_S = 30.0
RECORD_TIMEOUT_S = 10.0
RECORD_POLL_S = 0.01
LOG_LINE_TIMEOUT_S = 60.0
LOG_LINE_POLL_S = 0.1
# The hung worker ignores SIGTERM, so its stop ends with SIGKILL after this.
HANG_STOP_TIMEOUT_S = 1.0
READY_LINE = "supervisor ready"
# An idle supervisor runs for a few milliseconds at a time, so a high rate is needed to catch it.
PROFILE_RATE_HZ = 1000
FLOOR_STOP_TIMEOUT_S = 15.0
MIB = 1024 * 1024
FLOOR_SERVICE = "bench-floor"


@dataclass(frozen=True)
class Sizes:
    """How much each measure does; `--quick` shrinks everything."""

    restart_instances: int
    kills: int
    kill_gap_s: float
    hang_trials: int
    peer_hang_wait_s: float
    fleet: int
    coldstart_rounds: int
    settle_s: float
    idle_window_s: float
    profile_s: float

    @classmethod
    def of(cls, context: BenchContext) -> Sizes:
        return cls(
            restart_instances=context.size(3, 2),
            kills=context.size(20, 3),
            kill_gap_s=1.5,
            hang_trials=context.size(5, 1),
            peer_hang_wait_s=float(context.size(30, 5)),
            fleet=context.size(50, 5),
            coldstart_rounds=context.rounds(3, 1),
            settle_s=float(context.size(10, 2)),
            idle_window_s=float(context.size(60, 5)),
            profile_s=float(context.size(20, 3)),
        )


def sample(variant: str, measure: str, value: float, **extra: Any) -> dict[str, Any]:
    return {"variant": variant, "measure": measure, "value": value, **extra}


@dataclass
class Bench:
    """The shared state of one benchmark run: its watch, names, folders and the profile it took."""

    context: BenchContext
    sizes: Sizes
    watch: ControlWatch
    exchange: str
    marker: str
    folder: Path
    py_spy: Path | None = None
    profile: Profile | None = None
    notes: list[str] = field(default_factory=list)
    _fleets: int = 0

    def spec(self, launcher: Launcher, replicas: int, label: str, **overrides: Any) -> FleetSpec:
        self._fleets += 1
        return FleetSpec(
            replicas=replicas,
            folder=self.folder / f"{self._fleets:02d}-{launcher.key}-{label}",
            broker_url=self.context.broker_url,
            exchange=self.exchange,
            # One marker per fleet, so that stopping one fleet never sweeps another's processes.
            marker=f"{self.marker}-{self._fleets}",
            python=self.context.python,
            repo=self.context.repo,
            **overrides,
        )

    # Floors: the same child started bare by the benchmark, exec to ready.

    async def floor(self, launcher: Launcher, index: int) -> float:
        """Start the child of `launcher` bare (a worker for `mrq`) and return its exec-to-ready time."""
        if isinstance(launcher, MrqLauncher) and launcher.worker:
            return await self._worker_floor(index)
        return await self._child_floor(index)

    async def _worker_floor(self, index: int) -> float:
        setup = WorkerSetup(exchange=self.exchange, service=FLOOR_SERVICE)
        env = worker_env(self.context, setup, index, 0)
        env[MARKER_VARIABLE] = self.marker
        argv = [self.context.python, "-m", "worker", "--target", WORKER_TARGET]
        return await self._floor(argv, env, "floor-worker")

    async def _child_floor(self, index: int) -> float:
        params = {
            "broker_url": self.context.broker_url,
            "exchange": self.watch.control_exchange,
            "routing_key": "ready.floor",
            "deadline_s": CHILD_DEADLINE_S,
        }
        env = child_env({PARAMS_VARIABLE: json.dumps(params), MARKER_VARIABLE: self.marker})
        return await self._floor([self.context.python, str(CHILD_SCRIPT)], env, "floor-child")

    async def _floor(self, argv: list[str], env: dict[str, str], label: str) -> float:
        """Start `argv` as a supervisor does (Popen in a thread, output to a file) and time it to ready."""
        output = self.folder / f"{label}.log"
        started_s, process = await anyio.to_thread.run_sync(_popen, argv, env, self.context.repo, output)
        try:
            pid = process.pid
            await self.watch.wait_until(
                lambda: pid in self.watch.sightings, READY_TIMEOUT_S, f"{label} ready"
            )
            return (self.watch.sightings[pid].arrived_s - started_s) * 1000
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_stop_popen, process)

    # Restart latency: SIGKILL one child, time the replacement's ready message.

    async def restarts(self, launchers: Sequence[Launcher]) -> list[dict[str, Any]]:
        """Kill one child at a time, taking the variants in rotating order, so that load drift hits all alike.

        Every fleet runs from start to end; each kill comes right after a floor
        start of the same child, so that the two pair up.
        """
        sizes = self.sizes
        self.watch.forget()
        samples = []
        async with AsyncExitStack() as stack:
            fleets: dict[str, Fleet] = {}
            for launcher in launchers:
                spec = self.spec(launcher, sizes.restart_instances, "restart")
                fleets[launcher.key] = await stack.enter_async_context(run_fleet(launcher, spec))
            live = {
                key: [s.pid for s in await self._wait_fleet(f, READY_TIMEOUT_S)] for key, f in fleets.items()
            }
            await anyio.sleep(sizes.kill_gap_s)
            for kill in range(sizes.kills):
                for key in variant_order(kill, list(fleets)):
                    samples.append(await self._restart_once(fleets[key], live[key], kill))
                    await anyio.sleep(sizes.kill_gap_s)
        return samples

    async def _restart_once(self, fleet: Fleet, live: list[int], kill: int) -> dict[str, Any]:
        """Measure a floor start, then kill the next child of `live` and time its replacement."""
        launcher = fleet.launcher
        floor_ms = await self.floor(launcher, kill)
        slot = kill % len(live)
        killed_s = time.monotonic()
        replacement = await self._kill_and_wait(launcher, live[slot], killed_s)
        live[slot] = replacement.pid
        restart_ms = (replacement.arrived_s - killed_s) * 1000
        extra = {"kill": kill + 1, "floor_ms": floor_ms}
        if isinstance(launcher, MrqLauncher):
            extra["spawned_ms"] = await self._spawned_ms(fleet, replacement.pid, killed_s)
        logger.info(
            "restart measured variant={} kill={} latency_ms={:.1f} floor_ms={:.1f}",
            launcher.key,
            kill + 1,
            restart_ms,
            floor_ms,
        )
        return sample(launcher.key, "restart_ms", restart_ms, **extra)

    async def _spawned_ms(self, fleet: Fleet, pid: int, killed_s: float) -> float:
        """Return the time from the kill to mrq-supervisor's `instance started` line of the replacement."""
        logged_s = await _log_line_at(fleet.stderr_path, "instance started service=", f"pid={pid}")
        return (logged_s - killed_s) * 1000

    async def _wait_fleet(self, fleet: Fleet, timeout_s: float) -> list[Sighting]:
        prefix = fleet.launcher.ready_prefix
        return await self.watch.wait_ready(prefix, fleet.started_s, fleet.spec.replicas, timeout_s)

    async def _kill_and_wait(self, launcher: Launcher, victim: int, killed_s: float) -> Sighting:
        os.kill(victim, signal.SIGKILL)
        replacement = await self.watch.wait_ready(launcher.ready_prefix, killed_s, 1, RESTART_TIMEOUT_S)
        return replacement[0]

    # Hang detection.

    async def hang_mrq(self) -> list[dict[str, Any]]:
        """Block a worker's event loop; time the block to the supervisor's `instance.unhealthy` event.

        Trial k blocks the loop k/trials of a heartbeat interval after a heartbeat
        arrived, so that the trials cover every phase. Trial 0, right after a
        heartbeat, is the slowest case.
        """
        launcher = MrqLauncher(worker=True)
        spec = self.spec(launcher, 1, "hang", stop_timeout_s=HANG_STOP_TIMEOUT_S)
        self.watch.forget()
        samples = []
        async with run_fleet(launcher, spec) as fleet:
            pid = (await self._wait_fleet(fleet, READY_TIMEOUT_S))[0].pid
            for trial in range(self.sizes.hang_trials):
                await anyio.sleep(self.sizes.kill_gap_s)
                phase_s = spec.heartbeat_interval_s * trial / self.sizes.hang_trials
                outcome, pid = await self._hang_trial(launcher, spec, pid, trial, phase_s)
                samples.append(outcome)
        return samples

    async def _hang_trial(
        self, launcher: Launcher, spec: FleetSpec, pid: int, trial: int, phase_s: float
    ) -> tuple[dict[str, Any], int]:
        """Hang worker `pid` `phase_s` after its next heartbeat; return the sample and the new pid."""
        waiting_since_s = time.monotonic()
        await self.watch.wait_until(
            lambda: self.watch.latest_heartbeat.get(pid, 0.0) > waiting_since_s,
            READY_TIMEOUT_S,
            "a heartbeat",
        )
        await anyio.sleep(phase_s)

        record_path = spec.folder / f"hang-{trial}.json"
        sent_s = time.monotonic()
        body = json.dumps({"record": str(record_path)}).encode()
        await self.watch.send_to_queue(WORKER_SERVICE, body, "application/json")
        blocked = await _read_record(record_path)

        event = await self.watch.wait_event("instance.unhealthy", sent_s, HANG_EVENT_TIMEOUT_S)
        detection_s = event.arrived_s - float(blocked["blocked_s"])
        reason = event.body.get("data", {}).get("reason", "")
        replacement = await self.watch.wait_ready(
            launcher.ready_prefix, event.arrived_s, 1, RESTART_TIMEOUT_S
        )
        logger.info(
            "hang detected trial={} phase_s={:.2f} detection_s={:.3f} reason={}",
            trial + 1,
            phase_s,
            detection_s,
            reason,
        )
        outcome = sample(
            "mrq", "hang_detection_s", detection_s, trial=trial + 1, phase_s=phase_s, reason=reason
        )
        return outcome, replacement[0].pid

    async def hang_others(self, launchers: Sequence[Launcher]) -> list[dict[str, Any]]:
        """Hang one child under each launcher at once; wait to see whether any of them restarts it."""
        self.watch.forget()
        async with AsyncExitStack() as stack:
            fleets = [
                await stack.enter_async_context(run_fleet(x, self.spec(x, 1, "hang"))) for x in launchers
            ]
            hung = {
                fleet.launcher.key: (await self._wait_fleet(fleet, READY_TIMEOUT_S))[0] for fleet in fleets
            }
            sent_s = time.monotonic()
            for sighting in hung.values():
                await self.watch.send_to_queue(sighting.body["queue"], HANG_BODY, "text/plain")
            await anyio.sleep(self.sizes.peer_hang_wait_s)
            samples = [self._hang_outcome(fleet.launcher, sent_s) for fleet in fleets]
            for sighting in hung.values():
                _kill_quietly(sighting.pid)
        return samples

    def _hang_outcome(self, launcher: Launcher, sent_s: float) -> dict[str, Any]:
        restarted = self.watch.ready(launcher.ready_prefix, sent_s)
        waited_s = self.sizes.peer_hang_wait_s
        if restarted:
            after_s = min(s.arrived_s for s in restarted) - sent_s
            logger.info("hung child replaced variant={} after_s={:.2f}", launcher.key, after_s)
            return sample(launcher.key, "hang_replaced_s", after_s, waited_s=waited_s)
        logger.info("hung child never replaced variant={} waited_s={:g}", launcher.key, waited_s)
        return sample(launcher.key, "hang_never", 1.0, waited_s=waited_s)

    # Cold start of a fleet, then its idle cost.

    async def fleets(self, launchers: Sequence[Launcher]) -> list[dict[str, Any]]:
        """Cold-start every launcher's fleet once per round, in rotating order; the last round idles too."""
        samples = []
        rounds = self.sizes.coldstart_rounds
        by_key = {launcher.key: launcher for launcher in launchers}
        for index in range(rounds):
            for key in variant_order(index, list(by_key)):
                samples += await self._fleet_round(by_key[key], index, idle=index == rounds - 1)
        return samples

    async def _fleet_round(self, launcher: Launcher, index: int, *, idle: bool) -> list[dict[str, Any]]:
        spec = self.spec(launcher, self.sizes.fleet, f"fleet{index + 1}")
        self.watch.forget()
        async with run_fleet(launcher, spec) as fleet:
            ready = await self._wait_fleet(fleet, FLEET_READY_TIMEOUT_S)
            all_ready_s = ready[-1].arrived_s - fleet.started_s
            first_ready_s = ready[0].arrived_s - fleet.started_s
            samples = [
                sample(launcher.key, "coldstart_s", all_ready_s, round=index + 1),
                sample(launcher.key, "first_ready_s", first_ready_s, round=index + 1),
            ]
            logger.info(
                "cold start measured variant={} round={} all_ready_s={:.2f}",
                launcher.key,
                index + 1,
                all_ready_s,
            )
            if isinstance(launcher, MrqLauncher):
                samples += await _mrq_milestones(fleet, index)
            if idle:
                samples += await self._idle(fleet)
        return samples

    async def _idle(self, fleet: Fleet) -> list[dict[str, Any]]:
        key = fleet.launcher.key
        await anyio.sleep(self.sizes.settle_s)
        seen_before = len(self.watch.sightings)
        process = psutil.Process(fleet.pid)
        cpu_before, began_s = _cpu_s(process), time.monotonic()
        await anyio.sleep(self.sizes.idle_window_s)
        cpu_after, ended_s = _cpu_s(process), time.monotonic()
        rss_mib = process.memory_info().rss / MIB
        percent = (cpu_after - cpu_before) / (ended_s - began_s) * 100
        restarted = len(self.watch.sightings) - seen_before
        logger.info(
            "idle measured variant={} cpu_percent={:.3f} rss_mib={:.1f} restarts={}",
            key,
            percent,
            rss_mib,
            restarted,
        )
        samples = [
            sample(
                key, "idle_cpu_percent", percent, window_s=round(ended_s - began_s, 2), restarts=restarted
            ),
            sample(key, "idle_rss_mib", rss_mib),
        ]
        if key == "mrq" and self.py_spy is not None:
            output = fleet.spec.folder / "py-spy.txt"
            self.profile = await record(self.py_spy, fleet.pid, self.sizes.profile_s, PROFILE_RATE_HZ, output)
        return samples


def _popen(
    argv: list[str], env: dict[str, str], cwd: Path, output: Path
) -> tuple[float, subprocess.Popen[bytes]]:
    """Start a process the way mrq-supervisor does; return `time.monotonic()` just before, and the process."""
    with output.open("ab") as out:
        started_s = time.monotonic()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=cwd, env=env, start_new_session=True
        )
    return started_s, process


def _stop_popen(process: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM, wait up to FLOOR_STOP_TIMEOUT_S, then SIGKILL, and reap (blocking: use a thread)."""
    process.terminate()
    try:
        process.wait(FLOOR_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _cpu_s(process: psutil.Process) -> float:
    """Return the user and system CPU seconds of the process itself, its threads included, children not."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


async def _read_record(path: Path) -> dict[str, Any]:
    """Wait for the hang record that the worker writes just before it blocks, and return it."""
    record = anyio.Path(path)
    with anyio.move_on_after(RECORD_TIMEOUT_S):
        # Polling: the worker's loop is blocked right after it writes the file, so it cannot send word.
        while not await record.exists():  # noqa: ASYNC110
            await anyio.sleep(RECORD_POLL_S)
        loaded: dict[str, Any] = json.loads(await record.read_text())
        return loaded
    raise TimeoutError(f"no worker took the hang message: {path} missing after {RECORD_TIMEOUT_S:g} s")


async def _mrq_milestones(fleet: Fleet, index: int) -> list[dict[str, Any]]:
    """Return when mrq-supervisor logged its first line, its first spawn and `supervisor ready`, from exec."""
    path, key = fleet.stderr_path, fleet.launcher.key
    milestones = {
        "first_log_s": await _log_line_at(path, "supervisor starting"),
        "first_spawn_s": await _log_line_at(path, "instance started service="),
        "ready_line_s": await _log_line_at(path, READY_LINE),
    }
    return [sample(key, name, at_s - fleet.started_s, round=index + 1) for name, at_s in milestones.items()]


async def _log_line_at(path: Path, *texts: str) -> float:
    """Return the `time.monotonic()` of the first log line containing every one of `texts`.

    mrq-supervisor's log lines start with the local time to the millisecond, so
    the line's moment is exact to 1 ms even though the file is read later.
    """
    with anyio.move_on_after(LOG_LINE_TIMEOUT_S):
        while True:
            for line in (await anyio.Path(path).read_text(errors="replace")).splitlines():
                if all(text in line for text in texts):
                    logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                    return logged - (time.time() - time.monotonic())
            await anyio.sleep(LOG_LINE_POLL_S)
    raise TimeoutError(
        f"no line with {' and '.join(map(repr, texts))} in {path} within {LOG_LINE_TIMEOUT_S:g} s"
    )
