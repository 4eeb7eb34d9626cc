"""One service instance: its process, its state, its health verdicts and its restarts.

Each instance runs one task (`Instance.run`) that spawns the process, waits
for its exit or for a verdict (unhealthy, over memory, an operator command),
stops it, and decides by the restart policy what comes next. Verdicts come
from outside (the node's health check and sampler) through `_wake`, so an
instance task sleeps until something happens to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from sdk import names
from sdk.wire import Goodbye, Heartbeat, Hello
from supervisor.config import ServiceConfig
from supervisor.policy import LIVE_STATES, RestartPolicy, RestartTracker, StartSlot, State
from supervisor.process import (
    KILL_TIMEOUT_S,
    AdoptedProcess,
    ChildProcess,
    ExitStatus,
    SpawnError,
    StopError,
    WatchedProcess,
)

if TYPE_CHECKING:
    from supervisor.node import NodeContext

# After the broker connection comes back, workers need time to reconnect too.
RECONNECT_GRACE_S = 10.0


@dataclass
class Metrics:
    """psutil figures of an instance's process tree."""

    cpu_percent: float = 0.0
    rss_bytes: int = 0
    open_files: int = 0
    threads: int = 0
    processes: int = 0
    sampled_at: float = 0.0


@dataclass
class Outcome:
    """How a run of the process ended."""

    status: ExitStatus
    cause: str
    reason: str
    ran_s: float


def _single_error(exc: BaseException) -> BaseException:
    """Return the only error inside (nested) exception groups, or `exc` when there are several."""
    # An error in the body of an asyncio.TaskGroup reaches the caller wrapped in a group.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _kill_quickly(process: WatchedProcess) -> None:
    """Send SIGKILL to the process group and wait up to KILL_TIMEOUT_S for the exit."""
    process.kill_group()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_TIMEOUT_S):
            await process.wait()


def policy_of(config: ServiceConfig) -> RestartPolicy:
    return RestartPolicy(
        mode=config.restart,
        max_restarts=config.max_restarts,
        window_s=config.restart_window_s,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
        stable_after_s=config.stable_after_s,
    )


class Instance:
    """The slot `index` of a service: at most one process at a time."""

    def __init__(self, ctx: NodeContext, service: str, index: int, config: ServiceConfig) -> None:
        self.ctx = ctx
        self.service = service
        self.index = index
        self.config = config
        self.state = State.STOPPED
        self.desired_up = False
        self.process: WatchedProcess | None = None
        self.adoptable: AdoptedProcess | None = None
        self.tracker = RestartTracker(policy_of(config))
        self.restarts = 0
        self.spawns = 0
        self.started_at: float | None = None
        self.started_mono = 0.0
        self.ready_at: float | None = None
        self.startup_s: float | None = None
        self.state_since = time.time()
        self.last_exit: ExitStatus | None = None
        self.last_exit_reason: str | None = None
        self.last_exit_at: float | None = None
        self.heartbeat: Heartbeat | None = None
        self.heartbeat_mono: float | None = None
        self.hello: Hello | None = None
        self.metrics = Metrics()
        self.memory_over_since: float | None = None
        self.backoff_until: float | None = None
        self.outage_during_run = False
        self._wake = asyncio.Event()
        self._verdict: tuple[str, str] | None = None
        self._command: str | None = None
        self._exit: ExitStatus | None = None
        self._start_slot: StartSlot | None = None
        self._ready = False

    @property
    def name(self) -> str:
        return f"{self.service}:{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def uses_heartbeat(self) -> bool:
        return self.config.heartbeat

    # Requests from the node, the control plane and the health checks.

    def request_start(self) -> None:
        """Run the instance; an operator start also clears `fatal` and the restart count."""
        self._clear_fatal()
        self.desired_up = True
        self._command = "start"
        self._wake.set()

    def request_stop(self) -> None:
        self.desired_up = False
        self._command = "stop"
        self._wake.set()

    def request_restart(self) -> None:
        self._clear_fatal()
        self.desired_up = True
        self._command = "restart"
        self._wake.set()

    def _clear_fatal(self) -> None:
        if self.state in (State.FATAL, State.EXITED):
            self.tracker.reset()
            self._set_state(State.STOPPED)

    def give_verdict(self, cause: str, reason: str) -> None:
        """Stop and restart the running process because of `cause` (unhealthy, memory)."""
        if self.state in (State.STARTING, State.RUNNING) and self._verdict is None:
            self._verdict = (cause, reason)
            self._wake.set()

    def on_worker_message(self, message: Hello | Heartbeat | Goodbye) -> None:
        process = self.process
        if process is None or message.pid != process.pid:
            return  # a message from an earlier process of this slot
        if isinstance(message, Heartbeat):
            self.heartbeat = message
            now_mono = time.monotonic()
            age = max(0.0, time.time() - message.sent_at)
            self.heartbeat_mono = now_mono - min(age, self.ctx.settings.heartbeat_interval_s * 10)
        elif isinstance(message, Hello):
            self.hello = message
            self.ctx.routes_announced(self.service, message)
        if not self._ready and self.state == State.STARTING and isinstance(message, Heartbeat):
            self._ready = True
            self._wake.set()

    def health_deadline(self) -> float | None:
        """Return the monotonic time of the next health decision, or None when none is due."""
        # Until the spawn returns, started_mono is still the start of the previous process.
        if not self.uses_heartbeat or self._verdict is not None or self.process is None:
            return None
        settings = self.ctx.settings
        floor = self.ctx.connected_since_mono + settings.heartbeat_interval_s * settings.heartbeat_misses
        floor += RECONNECT_GRACE_S if self.ctx.reconnected else 0.0
        if self.state == State.STARTING and not self._ready:
            return max(self.started_mono + settings.start_timeout_s, floor)
        if self.state == State.RUNNING and self.heartbeat_mono is not None:
            limit = settings.heartbeat_interval_s * settings.heartbeat_misses
            return max(self.heartbeat_mono + limit, floor)
        return None

    def check_health(self, now_mono: float) -> None:
        """Give the unhealthy verdict when the deadline passed (only while the broker is up)."""
        if not self.ctx.broker_connected:
            return
        deadline = self.health_deadline()
        if deadline is None or now_mono < deadline:
            return
        settings = self.ctx.settings
        if self.state == State.STARTING:
            reason = f"no heartbeat within start_timeout_s={settings.start_timeout_s:g}"
        else:
            age = now_mono - (self.heartbeat_mono or now_mono)
            reason = f"no heartbeat for {age:.1f} s (heartbeat_misses={settings.heartbeat_misses})"
        self.give_verdict("unhealthy", reason)

    def check_memory(self, now: float) -> None:
        limit_mb = self.config.max_memory_mb
        if limit_mb is None or self.state != State.RUNNING:
            self.memory_over_since = None
            return
        if self.metrics.rss_bytes <= limit_mb * 1024 * 1024:
            self.memory_over_since = None
            return
        if self.memory_over_since is None:
            self.memory_over_since = now
            return
        if now - self.memory_over_since >= self.config.max_memory_grace_s:
            rss_mb = self.metrics.rss_bytes / 1024 / 1024
            self.give_verdict(
                "memory",
                f"RSS {rss_mb:.0f} MB over max_memory_mb={limit_mb} for {now - self.memory_over_since:.0f} s",
            )

    # The supervising loop.

    async def run(self) -> None:
        """Supervise the slot until cancelled.

        An error in any step makes this instance fatal instead of ending the node's task
        group, which would leave every other instance unsupervised.
        """
        while True:
            try:
                await self._run_once()
            except Exception as exc:
                await self._supervision_failed(exc)

    async def _run_once(self) -> None:
        if not self.desired_up or self.state == State.FATAL:
            self._command = None
            await self._wait()
            return
        if self.adoptable is None:
            self._start_slot = await self.ctx.start_slots.acquire()
            if not self._should_run():  # a stop may have come while waiting for the slot
                self._release_start_slot()
                return
        try:
            outcome = await self._run_process()
        finally:
            self._release_start_slot()
        await self._after_exit(outcome)

    def _should_run(self) -> bool:
        return self.desired_up and self.state != State.FATAL

    def _release_start_slot(self) -> None:
        slot, self._start_slot = self._start_slot, None
        if slot is not None:
            slot.release()

    async def _supervision_failed(self, exc: Exception) -> None:
        error = _single_error(exc)
        stop_failed = isinstance(error, StopError)
        if stop_failed:
            # The StopError message names what to check, so a traceback adds nothing.
            logger.error(
                "instance stop failed service={} instance={} pid={} error={}",
                self.service,
                self.index,
                self.pid,
                error,
            )
        else:
            logger.opt(exception=exc).error(
                "instance supervision failed service={} instance={} pid={}",
                self.service,
                self.index,
                self.pid,
            )
        process = self.process
        if process is not None and process.exit_status is None and not stop_failed:
            await _kill_quickly(process)
        # A process that survived SIGKILL stays recorded, so that shutdown reports it.
        if process is not None and process.exit_status is not None:
            self.process = None
        reason = (
            f"stop failed: {error}" if stop_failed else f"supervision failed: {type(error).__name__}: {error}"
        )
        self.backoff_until = None
        self._set_state(State.FATAL, reason=reason)
        try:
            await self.ctx.event("instance.fatal", self, reason=reason)
        except Exception as event_exc:
            logger.warning(
                "event not published kind=instance.fatal service={} instance={} error={}",
                self.service,
                self.index,
                event_exc,
            )

    async def _wait(self, timeout_s: float | None = None) -> None:
        # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for loses a cancellation
        # that arrives together with the wake-up, and the task then outlives its task group.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        self._wake.clear()

    async def _run_process(self) -> Outcome:
        self._verdict = None
        self._command = None
        self._exit = None
        self._ready = False
        self.outage_during_run = not self.ctx.broker_connected
        process = self._take_adopted() or await self._spawn()
        if process is None:
            return Outcome(ExitStatus.unknown(), "spawn", self.last_exit_reason or "spawn failed", 0.0)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_exit(process))
            return await self._supervise(process)

    async def _watch_exit(self, process: WatchedProcess) -> None:
        self._exit = await process.wait()
        self._wake.set()

    async def _spawn(self) -> WatchedProcess | None:
        self._set_state(State.STARTING)
        try:
            process = await ChildProcess.spawn(self.ctx.spawn_spec(self))
        except SpawnError as exc:
            self.last_exit_reason = str(exc)
            self.last_exit_at = time.time()
            logger.error(
                "instance spawn failed service={} instance={} error={}", self.service, self.index, exc
            )
            return None
        self._started(process)
        logger.info("instance started service={} instance={} pid={}", self.service, self.index, process.pid)
        await self.ctx.event("instance.started", self, pid=process.pid)
        return process

    def _take_adopted(self) -> WatchedProcess | None:
        process, self.adoptable = self.adoptable, None
        if process is None:
            return None
        self._set_state(State.STARTING)
        self._started(process)
        logger.info("instance adopted service={} instance={} pid={}", self.service, self.index, process.pid)
        return process

    def _started(self, process: WatchedProcess) -> None:
        self.process = process
        self.spawns += 1
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.ready_at = None
        self.heartbeat = None
        self.heartbeat_mono = None
        self.hello = None
        self.memory_over_since = None
        self.ctx.instance_changed(self)
        if not self.uses_heartbeat:
            self._ready = True
            self._wake.set()

    async def _supervise(self, process: WatchedProcess) -> Outcome:
        while True:
            await self._wait()
            if self._exit is not None:
                return self._exited(self._exit)
            if self._command in ("stop", "restart"):
                command, self._command = self._command, None
                return await self._stop(process, command, f"{command} requested")
            if self._verdict is not None:
                cause, reason = self._verdict
                self._set_state(State.UNHEALTHY, reason=reason)
                logger.warning(
                    "instance unhealthy service={} instance={} pid={} cause={} reason={}",
                    self.service,
                    self.index,
                    process.pid,
                    cause,
                    reason,
                )
                await self.ctx.event("instance.unhealthy", self, cause=cause, reason=reason)
                return await self._stop(process, cause, reason)
            if self._ready and self.state == State.STARTING:
                self._mark_running()
                await self.ctx.event("instance.running", self, startup_s=self.startup_s)

    def _mark_running(self) -> None:
        self.ready_at = time.time()
        self.startup_s = round(time.monotonic() - self.started_mono, 4)
        self._set_state(State.RUNNING)
        logger.info(
            "instance ready service={} instance={} pid={} startup_ms={:.0f}",
            self.service,
            self.index,
            self.pid,
            (self.startup_s or 0) * 1000,
        )

    async def _stop(self, process: WatchedProcess, cause: str, reason: str) -> Outcome:
        self._set_state(State.STOPPING, reason=reason)
        status = await process.stop(self.config.stop_timeout_s)
        return Outcome(status, cause, reason, time.monotonic() - self.started_mono)

    def _exited(self, status: ExitStatus) -> Outcome:
        return Outcome(status, "exit", status.describe(), time.monotonic() - self.started_mono)

    async def _after_exit(self, outcome: Outcome) -> None:
        self._record_exit(outcome)
        await self.ctx.event(
            "instance.exited",
            self,
            cause=outcome.cause,
            exit_code=outcome.status.code,
            signal=outcome.status.signal,
            reason=outcome.reason,
            ran_s=round(outcome.ran_s, 3),
        )
        if not self.desired_up:
            self._set_state(State.STOPPED)
            await self.ctx.event("instance.stopped", self)
            return
        if outcome.cause == "restart":
            self.restarts += 1
            return
        if outcome.status.code == names.EXIT_CONFIG or outcome.cause == "spawn":
            detail = await self.ctx.configuration_error(self) if outcome.cause != "spawn" else None
            await self._fatal(
                f"configuration error ({detail or outcome.reason}); a restart cannot help, "
                f"see `mrq-supervisor logs {self.name}`"
            )
            return
        if outcome.cause == "exit" and not self.tracker.wants_restart(outcome.status.success):
            self.desired_up = False
            self._set_state(State.EXITED, reason=outcome.reason)
            return
        await self._restart_later(outcome)

    def _record_exit(self, outcome: Outcome) -> None:
        self.last_exit = outcome.status
        self.last_exit_reason = outcome.reason
        self.last_exit_at = time.time()
        log = logger.info if outcome.cause in ("stop", "restart") else logger.warning
        log(
            "instance exited service={} instance={} pid={} status={} cause={} ran_s={:.1f}",
            self.service,
            self.index,
            self.pid,
            outcome.status.describe(),
            outcome.cause,
            outcome.ran_s,
        )
        self.process = None

    async def _restart_later(self, outcome: Outcome) -> None:
        now = time.monotonic()
        counts = not self.outage_during_run and self.ctx.broker_connected
        self.tracker.ran_for(outcome.ran_s)
        self.tracker.record(now, counts=counts)
        if self.tracker.too_many(now):
            policy = self.tracker.policy
            await self._fatal(
                f"more than max_restarts={policy.max_restarts} restarts within "
                f"restart_window_s={policy.window_s:g} (last: {outcome.reason})"
            )
            return
        delay_s = self.tracker.next_delay_s()
        self.restarts += 1
        logger.info(
            "instance restarting service={} instance={} backoff_s={:.2f} counted={} reason={}",
            self.service,
            self.index,
            delay_s,
            counts,
            outcome.reason,
        )
        await self.ctx.event("instance.restarting", self, backoff_s=round(delay_s, 3), reason=outcome.reason)
        if delay_s > 0:
            await self._backoff(delay_s)

    async def _backoff(self, delay_s: float) -> None:
        self._set_state(State.BACKOFF)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay_s
        self.backoff_until = time.time() + delay_s
        while self.desired_up and self._command not in ("start", "restart"):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await self._wait(remaining)
        self.backoff_until = None
        if not self.desired_up:
            self._set_state(State.STOPPED)

    async def _fatal(self, reason: str) -> None:
        self._set_state(State.FATAL, reason=reason)
        logger.error("instance fatal service={} instance={} reason={}", self.service, self.index, reason)
        await self.ctx.event("instance.fatal", self, reason=reason)

    def _set_state(self, state: State, *, reason: str | None = None) -> None:
        if state == self.state:
            return
        if self.state == State.STARTING:
            self._release_start_slot()
        self.state = state
        self.state_since = time.time()
        if state in (State.FATAL, State.EXITED) and reason:
            self.last_exit_reason = reason
        self.ctx.instance_changed(self)

    def snapshot(self) -> dict[str, Any]:
        """Return the figures that status, the dashboard and the metrics show."""
        now = time.time()
        live = self.state in LIVE_STATES
        heartbeat = self.heartbeat if live else None
        metrics = self.metrics
        # Figures of an earlier process, or none yet for this one, show as unknown.
        sampled = live and metrics.sampled_at > 0 and metrics.sampled_at >= (self.started_at or 0)
        return {
            "node": self.ctx.node,
            "service": self.service,
            "instance": self.index,
            "state": str(self.state),
            "pid": self.pid,
            "started_at": self.started_at if self.state in LIVE_STATES else None,
            "uptime_s": round(now - self.started_at, 1)
            if self.started_at and self.state in LIVE_STATES
            else None,
            "restarts": self.restarts,
            "cpu_percent": round(metrics.cpu_percent, 1) if sampled else None,
            "rss_bytes": metrics.rss_bytes if sampled else None,
            "open_files": metrics.open_files if sampled else None,
            "threads": metrics.threads if sampled else None,
            "heartbeat_age_s": round(now - heartbeat.sent_at, 2)
            if heartbeat and self.state in LIVE_STATES
            else None,
            "loop_lag_ms": heartbeat.loop_lag_ms if heartbeat else None,
            "processed": heartbeat.processed if heartbeat else None,
            "failed": heartbeat.failed if heartbeat else None,
            "in_flight": heartbeat.in_flight if heartbeat else None,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
            "last_exit_code": self.last_exit.code if self.last_exit else None,
            "last_exit_signal": self.last_exit.signal if self.last_exit else None,
            "last_exit_reason": self.last_exit_reason,
            "last_exit_at": self.last_exit_at,
            "startup_s": self.startup_s,
            "backoff_until": self.backoff_until,
            "kind": self.config.kind,
        }
