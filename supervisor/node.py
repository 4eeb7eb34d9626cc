"""The supervisor of one node: every service's instances, their health, the broker, shutdown.

`Node.run()` is `mrq-supervisor start`: it opens the registry, resolves and
connects to the broker, adopts the instances a previous supervisor left
behind, starts the rest, watches them, and on SIGTERM or SIGINT stops them
all in parallel. SIGHUP reloads supervisor.toml.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any, Protocol

import aiormq
import anyio
from loguru import logger

from sdk import __version__, names, signing
from sdk.codec import JSON
from sdk.connection import Broker
from sdk.errors import BrokerUnavailable, MrqError
from sdk.messenger import Messenger
from sdk.settings import SettingsModel
from sdk.settings import settings as sdk_settings
from sdk.wire import Goodbye, Heartbeat, Hello, NodeStatus
from supervisor import keys, logfiles
from supervisor.broker import PrivateBroker, resolve_broker
from supervisor.config import ConfigError, ServiceConfig, SupervisorConfig, SupervisorSettings, load_config
from supervisor.events import EventBus
from supervisor.group import ServiceGroup
from supervisor.heartbeats import HeartbeatListener
from supervisor.instance import Instance
from supervisor.policy import LIVE_STATES, StartSlots, State
from supervisor.process import SpawnSpec
from supervisor.registry import InstanceRecord, Registry, RouteInfo, ServiceRecord, registry_path
from supervisor.sampler import Sampler

SAMPLE_INTERVAL_S = 5.0
MIN_SAMPLE_INTERVAL_S = 0.5
# Seconds between two checks of every log file's size. A check costs one thread hop and
# one stat call per file.
ROTATE_INTERVAL_S = 1.0
PRESENCE_INTERVAL_S = 10.0
SHUTDOWN_GRACE_S = 10.0
ORPHAN_MARKER = "MRQ_SUPERVISOR_STATE_DIR"
STATE_LOCK_FILE = "supervisor.lock"
# A starting instance gives up its start slot after this long even if it is not ready.
START_SLOT_HOLD_MAX_S = 2.0


class NodeContext(Protocol):
    """The part of a node that its instances use."""

    node: str
    settings: SupervisorSettings
    broker_connected: bool
    connected_since_mono: float
    reconnected: bool

    start_slots: StartSlots

    def spawn_spec(self, instance: Instance) -> SpawnSpec: ...
    async def configuration_error(self, instance: Instance) -> str | None: ...
    async def event(self, kind: str, instance: Instance, **data: Any) -> None: ...
    def instance_changed(self, instance: Instance) -> None: ...
    def instance_removed(self, instance: Instance) -> None: ...
    def routes_announced(self, service: str, hello: Hello) -> None: ...
    async def wait_for(self, predicate: Callable[[], bool]) -> None: ...


class StartupError(Exception):
    """The supervisor cannot start. The message gives the reason and the setting to change."""


class Node:
    """Runs and watches every service instance of one node."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.settings = config.supervisor
        self.node = self.settings.node
        self.state_dir = self.settings.state_dir
        self.groups: dict[str, ServiceGroup] = {}
        self.broker_connected = False
        self.connected_since_mono = time.monotonic()
        self.reconnected = False
        self.started_at = time.time()
        self.key = b""
        self.broker_url = ""
        self.sdk_settings: SettingsModel | None = None
        self.broker: Broker | None = None
        self.messenger: Messenger | None = None
        self.private_broker: PrivateBroker | None = None
        self.registry = Registry(registry_path(self.state_dir))
        self.events = EventBus(self.node, self.registry)
        self.sampler = Sampler()
        self.start_slots = StartSlots(max(4, 2 * (os.cpu_count() or 1)), START_SLOT_HOLD_MAX_S)
        self.own_cpu_percent = 0.0
        self.own_rss_bytes = 0
        self.listener: HeartbeatListener | None = None
        self.task_group: asyncio.TaskGroup | None = None
        self.stop_requested = asyncio.Event()
        self.hurry = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.routes: dict[str, list[RouteInfo]] = {}
        self.extensions: list[Any] = []
        # Called with the new settings when a reload changes a logging key. `mrq-supervisor
        # start` sets it, so that a Node used as a library never configures logging.
        self.configure_logging: Callable[[SupervisorSettings], object] | None = None
        # A SIGHUP and a reload command can arrive together; each compares the file with
        # the configuration that the previous one left.
        self._reload_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._health_wake = asyncio.Event()
        self._dirty: set[Instance] = set()
        self._flush_wake = asyncio.Event()

    # NodeContext.

    def spawn_spec(self, instance: Instance) -> SpawnSpec:
        config = instance.config
        log_path = logfiles.instance_log_path(self.state_dir, instance.service, instance.index)
        argv = [config.python, "-m", "worker"] if config.module else list(config.command or [])
        return SpawnSpec(
            argv=argv,
            env=self.instance_env(instance.service, instance.index, config),
            cwd=config.cwd,
            stdout_path=log_path,
            stderr_path=log_path,
        )

    def instance_env(self, service: str, index: int, config: ServiceConfig) -> dict[str, str]:
        """Return the environment of an instance: the supervisor's, the service's env, then mrq's settings."""
        settings = self.settings
        drain_s = max(0.1, config.stop_timeout_s - min(1.0, config.stop_timeout_s / 4))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MRQ_")}
        env.update(config.env)
        env.update(
            {
                "MRQ_BROKER_URL": self.broker_url,
                "MRQ_EXCHANGE": settings.exchange,
                "MRQ_NODE": self.node,
                "MRQ_SERVICE_NAME": service,
                "MRQ_INSTANCE": str(index),
                "MRQ_HEARTBEAT_INTERVAL_S": repr(settings.heartbeat_interval_s),
                "MRQ_HEARTBEAT_MISSES": str(settings.heartbeat_misses),
                "MRQ_STOP_TIMEOUT_S": repr(drain_s),
                "MRQ_CLUSTER_KEY": self.key.decode(),
                "MRQ_COMMAND_MAX_AGE_S": repr(settings.command_max_age_s),
                "MRQ_LOG_LEVEL": settings.log_level,
                "MRQ_LOG_FORMAT": settings.log_format,
                "MRQ_PREFETCH": str(config.prefetch),
                "MRQ_CONCURRENCY": str(config.concurrency),
                "MRQ_QUEUE_TYPE": config.queue_type,
                ORPHAN_MARKER: str(self.state_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if config.module:
            env["MRQ_TARGET"] = config.module
        return env

    async def event(self, kind: str, instance: Instance, **data: Any) -> None:
        await self.events.publish(kind, instance.service, instance.index, **data)

    async def configuration_error(self, instance: Instance) -> str | None:
        """Return the one-line reason a worker wrote before it exited with the configuration-error code."""
        path = logfiles.instance_log_path(self.state_dir, instance.service, instance.index)
        try:
            lines = await logfiles.tail(path, 40)
        except OSError:
            return None
        reasons = [line.strip() for line in lines if line.startswith("worker: ")]
        return reasons[-1].removeprefix("worker: ") if reasons else None

    def instance_changed(self, instance: Instance) -> None:
        self._dirty.add(instance)
        self._flush_wake.set()
        self._health_wake.set()
        self._changed.set()

    def instance_removed(self, instance: Instance) -> None:
        self._dirty.discard(instance)
        if self.task_group is not None:
            self.task_group.create_task(self.registry.remove_instance(instance.service, instance.index))

    def routes_announced(self, service: str, hello: Hello) -> None:
        routes = [
            RouteInfo(service=r.service, route=r.route, queue=r.queue, kind=r.kind) for r in hello.routes
        ]
        if self.routes.get(service) == routes:
            return
        self.routes[service] = routes
        if self.task_group is not None:
            self.task_group.create_task(self._store_routes(service, routes))

    async def _store_routes(self, service: str, routes: list[RouteInfo]) -> None:
        try:
            await self.registry.set_routes(service, routes)
        except Exception as exc:
            logger.warning("routes not stored service={} error={}", service, exc)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    # Queries used by the control plane, the dashboard and the start-up table.

    def instances(self) -> list[Instance]:
        return [instance for group in self.groups.values() for instance in group.instances]

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "broker_connected": self.broker_connected,
            "cpu_percent": round(self.own_cpu_percent, 2),
            "rss_bytes": self.own_rss_bytes,
            "services": {
                name: {
                    "kind": group.config.kind,
                    "replicas": group.replicas,
                    "routes": [dataclasses.asdict(r) for r in self.routes.get(name, [])],
                }
                for name, group in self.groups.items()
            },
            "instances": [instance.snapshot() for instance in self.instances()],
        }

    # The main task.

    async def run(self) -> int:
        """Run until a signal or a shutdown command; return the exit code."""
        from supervisor.startup import Startup

        startup = Startup(self)
        code = 0
        async with AsyncExitStack() as stack:
            prepare_state_dir(self.state_dir)
            lock = _lock_state_dir(self.state_dir, self.node)
            stack.callback(os.close, lock)
            await self.registry.open()
            stack.push_async_callback(self.registry.close)
            startup.show_known_services(await self.registry.services(), await self.registry.instances())
            self.key = await anyio.to_thread.run_sync(keys.load_or_create, self.settings)
            await self._connect_broker(stack)
            self._install_signal_handlers()
            try:
                async with asyncio.TaskGroup() as task_group:
                    self.task_group = task_group
                    await self._start(task_group, startup)
                    await self._serve()
                    code = await self._shutdown()
                    raise _Done
            except* _Done:
                pass
        logger.info("supervisor stopped node={} exit_code={}", self.node, code)
        return code

    async def _connect_broker(self, stack: AsyncExitStack) -> None:
        timeout_s = self.settings.start_timeout_s
        url, private = await resolve_broker(self.settings.broker, self.state_dir, timeout_s)
        self.broker_url, self.private_broker = url, private
        if private is not None:
            stack.push_async_callback(self._stop_private_broker)
            await self.registry.set_meta("private_broker_url", url)
        self.sdk_settings = sdk_settings.resolve(
            broker_url=url,
            exchange=self.settings.exchange,
            node=self.node,
            cluster_key=self.key.decode(),
            publish_timeout_s=5.0,
            connect_timeout_s=min(10.0, timeout_s),
        )
        self.broker = Broker(
            self.sdk_settings, connection_name=f"mrq supervisor node={self.node} pid={os.getpid()}"
        )
        try:
            await self.broker.connect()
        except BrokerUnavailable as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(self.broker.close)
        self.broker.add_listener(self._on_connection_change)
        self.broker_connected = True
        self.connected_since_mono = time.monotonic()
        self.messenger = Messenger(self.broker)
        await self.messenger.start()
        await self.broker.declare_exchange(self.settings.control_exchange)
        self.events.broker = self.broker
        ttl_s = self.settings.heartbeat_interval_s * self.settings.heartbeat_misses
        self.listener = HeartbeatListener(self.broker, self.node, ttl_s, self._on_worker_message)
        await self.listener.start()
        await self.listener.set_streaming(True)

    async def _stop_private_broker(self) -> None:
        if self.private_broker is not None:
            logger.info("stopping the private broker node={}", self.private_broker.node_name)
            with anyio.CancelScope(shield=True):
                await self.private_broker.stop()

    def _on_connection_change(self, up: bool) -> None:
        self.broker_connected = up
        if up:
            self.connected_since_mono = time.monotonic()
            self.reconnected = True
        else:
            for instance in self.instances():
                if instance.state in LIVE_STATES:
                    instance.outage_during_run = True
        logger.info("broker {} node={}", "connected" if up else "disconnected", self.node)
        self._health_wake.set()

    def _on_worker_message(self, message: Hello | Heartbeat | Goodbye) -> None:
        group = self.groups.get(message.service)
        if group is None or message.node != self.node or message.instance >= group.replicas:
            return
        group.instances[message.instance].on_worker_message(message)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_stop(signum: int) -> None:
            name = signal.Signals(signum).name
            if self.stop_requested.is_set():
                logger.warning("second signal, killing instances now signal={}", name)
                self.hurry.set()
            else:
                logger.info("stopping signal={}", name)
                self.stop_requested.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    async def _start(self, task_group: asyncio.TaskGroup, startup: Any) -> None:
        from supervisor.adoption import adopt_leftovers

        known = {service.name: service for service in await self.registry.services()}
        for name, config in self.config.services.items():
            group = ServiceGroup(self, name, config)
            self.groups[name] = group
            for _ in range(config.replicas):
                group.add_instance(task_group)
            record = _service_record(name, config)
            previous = known.get(name)
            # Adopted workers do not announce their routes again; keep those of the same configuration.
            if previous is not None and previous.fingerprint == record.fingerprint and previous.routes:
                record = dataclasses.replace(record, routes=previous.routes)
                self.routes[name] = list(previous.routes)
            await self.registry.upsert_service(record)
        # Extensions start first: the control server refuses a duplicate node name
        # before this supervisor adopts or stops any process of the state folder.
        for extension in self.extensions:
            await extension.start(self)
        await adopt_leftovers(self)
        for background in (
            self._health_loop,
            self._sample_loop,
            self._rotate_loop,
            self._flush_loop,
            self._presence_loop,
        ):
            task_group.create_task(background())
        await self.events.publish("node.started", None, None, pid=os.getpid(), version=__version__)
        for group in self.groups.values():
            group.start_all()
        await startup.wait_ready_and_report()

    async def _serve(self) -> None:
        while not self.stop_requested.is_set():
            stop = asyncio.ensure_future(self.stop_requested.wait())
            reload = asyncio.ensure_future(self.reload_requested.wait())
            try:
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                reload.cancel()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                await self.reload()

    def request_shutdown(self) -> None:
        self.stop_requested.set()

    async def _shutdown(self) -> int:
        """Stop every instance and return the exit code: 1 when a process outlived SIGKILL, else 0."""
        instances = self.instances()
        live = sum(1 for i in instances if i.state in LIVE_STATES)
        logger.info("stopping all instances node={} live={}", self.node, live)
        await self.events.publish("node.stopping", None, None, live=live)
        for extension in reversed(self.extensions):
            await extension.stop()
        for group in self.groups.values():
            group.stop_all()
        deadline_s = (
            max((g.config.stop_timeout_s for g in self.groups.values()), default=0) + SHUTDOWN_GRACE_S
        )
        waiter = asyncio.ensure_future(self.wait_for(lambda: all(not _live(i) for i in self.instances())))
        hurry = asyncio.ensure_future(self.hurry.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, hurry}, timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                self._kill_all()
                await asyncio.wait({waiter}, timeout=SHUTDOWN_GRACE_S)
        finally:
            waiter.cancel()
            hurry.cancel()
        code = self._report_survivors()
        await self.publish_presence("down")
        await self._flush_dirty()
        return code

    def _report_survivors(self) -> int:
        survivors = [i for i in self.instances() if _live(i)]
        if not survivors:
            return 0
        logger.error(
            "instances still running after SIGKILL node={} grace_s={:g} instances={} pids={}; "
            "they are probably in uninterruptible sleep (state D in ps), so check what they wait for "
            "and kill them before starting this node again",
            self.node,
            SHUTDOWN_GRACE_S,
            ",".join(i.name for i in survivors),
            ",".join(str(i.pid) for i in survivors if i.pid is not None) or "unknown",
        )
        return 1

    def _kill_all(self) -> None:
        for instance in self.instances():
            if instance.process is not None:
                instance.process.kill_group()

    # Reload.

    async def reload(self) -> dict[str, Any]:
        """Apply a changed supervisor.toml; only services whose settings changed are touched.

        Returns the summary of `supervisor.reload.apply_reload` with `ok`, which is false
        (with `error`) when the file could not be loaded or a rolling restart stopped, and
        without the summary but with `partial` when applying the changes failed partway.
        """
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        from supervisor.reload import apply_reload

        try:
            new = await anyio.to_thread.run_sync(load_config, self.config.path)
        except ConfigError as exc:
            return await self._reload_failed(str(exc))
        except Exception as exc:
            logger.opt(exception=exc).debug("configuration not loaded path={}", self.config.path)
            return await self._reload_failed(f"{self.config.path}: cannot load: {type(exc).__name__}: {exc}")
        assert self.task_group is not None
        try:
            summary = await apply_reload(self, new, self.task_group)
        except Exception as exc:
            logger.opt(exception=exc).error("reload failed partway node={}", self.node)
            error = f"applying the changes failed partway: {type(exc).__name__}: {exc}"
            await self.events.publish("config.reload_failed", None, None, error=error)
            return {"ok": False, "error": error, "partial": True}
        # The [supervisor] table stays the one in effect, so that the next reload still
        # reports the keys that need a restart.
        self.config = new.model_copy(update={"supervisor": self.settings})
        for name, service_config in new.services.items():
            routes = self.routes.get(name, [])
            await self.registry.upsert_service(
                dataclasses.replace(_service_record(name, service_config), routes=routes)
            )
        await self.events.publish("config.reloaded", None, None, **summary)
        failed = summary["failed"]
        if failed:
            return {"ok": False, "error": "; ".join(failed.values()), **summary}
        return {"ok": True, **summary}

    async def _reload_failed(self, error: str) -> dict[str, Any]:
        logger.error("reload failed, configuration kept:\n{}", error)
        await self.events.publish("config.reload_failed", None, None, error=error)
        return {"ok": False, "error": error}

    def apply_settings(self, settings: SupervisorSettings) -> None:
        """Use new values of the [supervisor] keys that a reload applies at once."""
        logging_changed = any(
            getattr(settings, key) != getattr(self.settings, key)
            for key in ("log_level", "log_max_bytes", "log_backups")
        )
        self.settings = settings
        if logging_changed and self.configure_logging is not None:
            self.configure_logging(settings)

    # Background loops.

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._health_step()
            except (ConnectionError, TimeoutError, MrqError, aiormq.exceptions.AMQPError) as exc:
                logger.warning("health check interrupted error={}", exc)
                await asyncio.sleep(1.0)

    async def _health_step(self) -> None:
        listener = self.listener
        assert listener is not None
        # Cleared before the first await, so that a change during set_streaming wakes the wait below.
        self._health_wake.clear()
        instances = self.instances()
        await listener.set_streaming(any(i.state == State.STARTING and i.uses_heartbeat for i in instances))
        deadlines = [d for i in instances if (d := i.health_deadline()) is not None]
        now = time.monotonic()
        timeout_s = max(0.0, min(deadlines) - now) if deadlines else 5.0
        # asyncio.timeout, unlike wait_for on Python 3.11, keeps a cancellation that comes with the wake-up.
        with suppress(TimeoutError):
            async with asyncio.timeout(min(timeout_s, 5.0)):
                await self._health_wake.wait()
        now = time.monotonic()
        if self.broker_connected and any(d <= now for d in deadlines):
            if not await listener.pull():
                # Without fresh heartbeats a missed deadline proves nothing: try again shortly.
                await asyncio.sleep(0.2)
                return
            now = time.monotonic()
        for instance in self.instances():
            instance.check_health(now)

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(sample_interval_s([group.config for group in self.groups.values()]))
            await self.sample()

    async def sample(self) -> None:
        """Take psutil figures of every instance now, in a thread, and apply the memory limits."""
        live = {i.pid: i for i in self.instances() if i.pid is not None}
        figures = await anyio.to_thread.run_sync(self.sampler.sample, list(live))
        self.own_cpu_percent, self.own_rss_bytes = await anyio.to_thread.run_sync(self.sampler.own)
        now = time.time()
        for pid, instance in live.items():
            figure = figures.get(pid)
            if figure is None:
                continue
            metrics = instance.metrics
            metrics.cpu_percent = figure.cpu_percent
            metrics.rss_bytes = figure.rss_bytes
            metrics.open_files = figure.open_files
            metrics.threads = figure.threads
            metrics.processes = figure.processes
            metrics.sampled_at = figure.sampled_at
            instance.check_memory(now)

    async def _rotate_loop(self) -> None:
        paths: dict[tuple[str, int], str] = {}
        while True:
            await asyncio.sleep(ROTATE_INTERVAL_S)
            # A stat of a local file takes microseconds, less than a hop to a worker
            # thread, so only the rotation itself goes to one.
            oversize: list[Path] = []
            for instance in self.instances():
                key = (instance.service, instance.index)
                path = paths.get(key)
                if path is None:
                    path = paths[key] = str(logfiles.instance_log_path(self.state_dir, *key))
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue
                if size > self.settings.log_max_bytes:
                    oversize.append(Path(path))
            if oversize:
                await anyio.to_thread.run_sync(self._rotate, oversize)

    def _rotate(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                if logfiles.rotate_if_needed(path, self.settings.log_max_bytes, self.settings.log_backups):
                    logger.info("log rotated path={}", path)
            except OSError as exc:
                logger.warning("log rotation failed path={} error={}", path, exc)

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            await self._flush_dirty()

    async def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for instance in dirty:
            try:
                await self.registry.put_instance(_instance_record(self, instance))
            except Exception as exc:
                logger.warning(
                    "instance not stored service={} instance={} error={}",
                    instance.service,
                    instance.index,
                    exc,
                )

    async def _presence_loop(self) -> None:
        while True:
            await self.publish_presence("up")
            await asyncio.sleep(PRESENCE_INTERVAL_S)

    async def publish_presence(self, state: str) -> None:
        broker = self.broker
        if broker is None or not broker.connected:
            return
        status = NodeStatus(
            node=self.node,
            pid=os.getpid(),
            host=socket.gethostname(),
            version=__version__,
            started_at=self.started_at,
            sent_at=time.time(),
            state="up" if state == "up" else "down",
            # Without its token: anyone who reads the control exchange would get it.
            dashboard_url=_without_query(getattr(self, "dashboard_url", None)),
        )
        body = status.to_json()
        properties = broker.properties(
            content_type=JSON, persistent=False, headers=signing.sign_headers(self.key, body)
        )
        await broker.publish_nowait(
            self.settings.control_exchange, names.supervisor_presence_key(self.node), body, properties
        )


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state folder if missing; raise StartupError unless it is a folder this user can write.

    Its messages name the folder, the problem and the setting to change.
    """
    fix = "give state_dir in [supervisor] (or MRQ_STATE_DIR) a folder that this user can create and write"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(
            f"state folder {state_dir} not usable: it is a file, not a folder; {fix}"
        ) from None
    except OSError as exc:
        raise StartupError(f"state folder {state_dir} cannot be created: {exc.strerror}; {fix}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StartupError(f"state folder {state_dir} not writable by this user; {fix}")


def _lock_state_dir(state_dir: Path, node: str) -> int:
    """Lock the state folder for this supervisor; raise StartupError when another one has it.

    Two supervisors on one state folder would adopt and stop each other's
    instances. The lock goes with the process, also when it is killed.
    """
    path = state_dir / STATE_LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise StartupError(
            f"the state folder {state_dir} is in use by another running supervisor ({owner}); "
            "give each supervisor its own state_dir in [supervisor] or MRQ_STATE_DIR"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"pid={os.getpid()} node={node}\n".encode(), 0)
    return descriptor


def _without_query(url: str | None) -> str | None:
    return url.split("?", 1)[0] if url else None


class _Done(Exception):
    """Ends the node's task group after a clean shutdown."""


def sample_interval_s(configs: list[ServiceConfig]) -> float:
    """Return the time between two samples: SAMPLE_INTERVAL_S, or shorter for a short memory grace.

    A memory limit acts at the first sample at least `max_memory_grace_s` after the first
    sample over the limit, so sampling every half grace period restarts an instance at most
    about two grace periods after it crossed the limit. The floor of MIN_SAMPLE_INTERVAL_S
    bounds the cost of a psutil pass over every process.
    """
    graces = [c.max_memory_grace_s for c in configs if c.max_memory_mb is not None]
    if not graces:
        return SAMPLE_INTERVAL_S
    return max(MIN_SAMPLE_INTERVAL_S, min(SAMPLE_INTERVAL_S, min(graces) / 2))


def _live(instance: Instance) -> bool:
    return instance.state in LIVE_STATES or instance.process is not None


def _service_record(name: str, config: ServiceConfig) -> ServiceRecord:
    return ServiceRecord(
        name=name,
        kind=config.kind,
        target=config.module or " ".join(config.command or []),
        fingerprint=config.fingerprint(),
        replicas=config.replicas,
        routes=[],
        updated_at=time.time(),
    )


def _instance_record(node: Node, instance: Instance) -> InstanceRecord:
    process = instance.process
    exit_status = instance.last_exit
    return InstanceRecord(
        service=instance.service,
        index=instance.index,
        pid=process.pid if process is not None else None,
        start_time=process.start_time if process is not None else None,
        state=str(instance.state),
        restarts=instance.restarts,
        last_exit_code=exit_status.code if exit_status else None,
        last_exit_signal=exit_status.signal if exit_status else None,
        last_exit_reason=instance.last_exit_reason,
        last_exit_at=instance.last_exit_at,
        started_at=instance.started_at,
        ready_at=instance.ready_at,
        log_path=logfiles.instance_log_path(node.state_dir, instance.service, instance.index),
    )
