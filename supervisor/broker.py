"""Broker selection for the supervisor, and a private RabbitMQ node it can run as a child.

`resolve_broker` implements the `broker = "auto"` setting. `PrivateBroker` runs
`rabbitmq-server` in the foreground in a process group of its own, keeps the node's data,
logs, configuration and Erlang cookie in one folder, and binds its AMQP and Erlang
distribution listeners to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import aio_pika
import anyio
import anyio.to_thread
import psutil
import yarl
from anyio.abc import Process
from loguru import logger

__all__ = [
    "LOCAL_BROKER_URL",
    "SERVER_SEARCH_DIRS",
    "BrokerConfigError",
    "BrokerControlError",
    "BrokerError",
    "BrokerStartError",
    "BrokerUnavailableError",
    "PrivateBroker",
    "find_rabbitmq_server",
    "mask_url",
    "probe_amqp",
    "resolve_broker",
    "validate_broker_url",
]

LOCAL_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""The broker that `broker = "auto"` uses when it completes an AMQP handshake."""

SERVER_SEARCH_DIRS = (Path("/usr/sbin"), Path("/usr/lib/rabbitmq/bin"))
"""Folders searched for rabbitmq-server after PATH."""

_LOOPBACK = "127.0.0.1"
_LOOPBACK_DIST_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
# rabbitmqctl's own distribution listener takes a port from this range (rabbitmq-env, 3.10.8).
_CTL_DIST_PORTS = range(35672, 35683)
_NAME_PREFIX = re.compile(r"[A-Za-z0-9_-]+")
_CONNECTION_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}

_PROBE_TIMEOUT_S = 2.0
_PROBE_INTERVAL_S = 0.25
_REAP_TIMEOUT_S = 10.0
_ORPHAN_STOP_TIMEOUT_S = 20.0
_LOG_TAIL_LINES = 8
_LOG_ERROR_LINES = 5
_LOG_LINE_MAX_CHARS = 400

_FIX_HINT = (
    "install RabbitMQ (apt-get install rabbitmq-server) so that the supervisor can start a "
    'private node, or set broker = "amqp://USER:PASSWORD@HOST:PORT/" in the [supervisor] '
    "table of supervisor.toml or the MRQ_BROKER_URL environment variable"
)


class BrokerError(Exception):
    """Base class of the errors raised by this module."""


class BrokerConfigError(BrokerError):
    """A broker setting or a PrivateBroker argument is invalid."""


class BrokerUnavailableError(BrokerError):
    """No broker completed an AMQP handshake and no rabbitmq-server is installed to start one."""


class BrokerStartError(BrokerError):
    """A private node did not start. The message quotes the end of its log."""


class BrokerControlError(BrokerError):
    """A rabbitmqctl command against a private node failed or timed out."""


def mask_url(url: str) -> str:
    """Return url with its password replaced by ***, for logs and error messages."""
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return "<unparsable URL>"
    if parsed.password is None:
        return url
    return str(parsed.with_password("***"))


async def probe_amqp(url: str, timeout_s: float) -> bool:
    """Return True when a broker at url completes an AMQP handshake within timeout_s.

    A refused or reset connection, a timeout, a rejected login and a URL without a host
    all return False.
    """
    parsed = yarl.URL(url)
    if not parsed.host:
        return False

    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    try:
        with anyio.fail_after(timeout_s):
            # A plain TCP connect goes first because aiormq logs every refused attempt.
            stream = await anyio.connect_tcp(parsed.host, port)
            await stream.aclose()
            await _amqp_handshake(parsed, timeout_s)
    except OSError as error:  # aiormq's AMQPError and TimeoutError are OSError subclasses
        logger.debug("amqp probe failed url={} error={!r}", mask_url(url), error)
        return False
    return True


async def _amqp_handshake(url: yarl.URL, timeout_s: float) -> None:
    # aio-pika 10.2.1's Connection.__del__ schedules close() when the connection is open. In a
    # thread without an event loop, such as a worker thread, Python then warns that close()
    # was never awaited. So a failed attempt is closed here too.
    connection = aio_pika.Connection(url)
    try:
        await connection.connect(timeout=timeout_s)
    finally:
        with anyio.move_on_after(timeout_s, shield=True), contextlib.suppress(OSError):
            await connection.close()


def find_rabbitmq_server() -> str | None:
    """Return the path of rabbitmq-server from PATH or SERVER_SEARCH_DIRS, or None."""
    found = shutil.which("rabbitmq-server")
    if found is not None:
        return found

    for folder in SERVER_SEARCH_DIRS:
        candidate = folder / "rabbitmq-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def validate_broker_url(setting: str) -> str:
    """Return setting unchanged when it is an amqp:// or amqps:// URL with a host."""
    try:
        parsed = yarl.URL(setting)
    except (TypeError, ValueError) as error:
        raise BrokerConfigError(_bad_setting_message(setting)) from error

    if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
        raise BrokerConfigError(_bad_setting_message(setting))
    return setting


def _bad_setting_message(setting: str) -> str:
    return (
        f'invalid broker setting {mask_url(setting)!r}: expected "auto" or a URL of the form '
        "amqp://USER:PASSWORD@HOST:PORT/ (or amqps://...); fix broker in the [supervisor] "
        "table of supervisor.toml or the MRQ_BROKER_URL environment variable"
    )


async def resolve_broker(
    setting: str,
    state_dir: Path,
    timeout_s: float,
    *,
    local_url: str = LOCAL_BROKER_URL,
    find_server: Callable[[], str | None] = find_rabbitmq_server,
) -> tuple[str, PrivateBroker | None]:
    """Return the broker URL for setting, and the private node started for it, if any.

    A URL setting is validated and returned. "auto" returns local_url when a broker there
    completes a handshake within timeout_s. Otherwise it starts a PrivateBroker in
    state_dir/broker with the start deadline timeout_s, and the caller must stop it last.
    """
    if setting != "auto":
        return validate_broker_url(setting), None

    if await probe_amqp(local_url, timeout_s):
        logger.info("broker found url={}", mask_url(local_url))
        return local_url, None

    server = await anyio.to_thread.run_sync(find_server)
    if server is None:
        raise BrokerUnavailableError(
            f"no broker accepted an AMQP handshake at {mask_url(local_url)}, and "
            f"rabbitmq-server was not found on PATH or in "
            f"{', '.join(map(str, SERVER_SEARCH_DIRS))}; {_FIX_HINT}"
        )

    logger.info("broker not found, starting private node url={}", mask_url(local_url))
    broker = PrivateBroker(state_dir / "broker", server_path=server)
    await broker.start(timeout_s)
    return broker.url, broker


def _direct_server_script(server: Path) -> Path:
    """Return the script that Debian's rabbitmq-server wrapper would run, else server.

    Debian's wrapper (rabbitmq-server 3.10.8-1.1+deb12u1) re-runs itself as
    `su rabbitmq -c ...` when started as root. su -c (util-linux 2.38.1) starts a new
    session, so the node leaves the caller's process group. su also sets
    HOME=/var/lib/rabbitmq, so the node shares the system node's Erlang cookie.
    Running the script directly avoids both.
    """
    real = server.resolve()
    if real.name != "rabbitmq-script-wrapper":
        return server
    direct = real.parent / "rabbitmq-server"
    return direct if direct.is_file() else server


def _free_loopback_port(exclude: Collection[int]) -> int:
    for _attempt in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in exclude and port not in _CTL_DIST_PORTS:
            return port
    raise BrokerStartError(f"found no free TCP port on {_LOOPBACK} after 100 attempts")


def _quote_log(log_file: Path, offset: int) -> str:
    try:
        with log_file.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as error:
        return f"(could not read the log: {error})"

    lines = [line[:_LOG_LINE_MAX_CHARS] for line in text.splitlines() if line.strip()]
    if not lines:
        return "(the log is empty)"

    # The first error lines name the cause, while the last ones show how the boot ended.
    tail = lines[-_LOG_TAIL_LINES:]
    errors = [line for line in lines[: -len(tail)] if "[error]" in line][:_LOG_ERROR_LINES]
    quoted = "\n".join(tail)
    if errors:
        quoted = "\n".join(errors) + "\n...\n" + quoted
    return quoted


def _select_connections(listing: str, name_contains: str | None) -> list[str]:
    """Return the connection pids from `list_connections pid client_properties` output."""
    selected = []
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        if not pid.startswith("<"):
            continue
        if name_contains is None:
            selected.append(pid)
            continue

        match = _CONNECTION_NAME.search(properties)
        if match is not None and name_contains in _unescape(match.group(1)):
            selected.append(pid)
    return selected


def _unescape(quoted: str) -> str:
    # NOTE: decodes only the backslash escapes that rabbitmqctl uses for ASCII text. A name
    # with other escaped characters may not match name_contains.
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), quoted)


class PrivateBroker:
    """A RabbitMQ node of our own, with its data, logs and cookie in base_dir.

    The node runs as the calling user. Its name derives from base_dir, so a later
    PrivateBroker on the same folder finds the same durable queues and can stop a node
    that a crashed owner left running. A lock file keeps two owners off one folder.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        name_prefix: str = "mrq",
        amqp_port: int | None = None,
        server_path: str | None = None,
    ) -> None:
        if not _NAME_PREFIX.fullmatch(name_prefix):
            raise BrokerConfigError(
                f"invalid name_prefix {name_prefix!r}: expected letters, digits, '-' or '_'"
            )
        if amqp_port is not None and not 0 < amqp_port < 65536:
            raise BrokerConfigError(f"invalid amqp_port {amqp_port}: expected 1..65535")

        self._base_dir = base_dir.absolute()
        digest = hashlib.sha256(str(self._base_dir).encode()).hexdigest()[:12]
        self._node_name = f"{name_prefix}-{digest}@localhost"
        self._server_path = server_path
        self._server: Path | None = None
        self._ctl: Path | None = None
        self._amqp_port = amqp_port
        self._dist_port: int | None = None
        self._process: Process | None = None
        self._tree: dict[int, psutil.Process] = {}
        self._lock_fd: int | None = None

    @property
    def base_dir(self) -> Path:
        """Folder holding the node's data, logs, configuration and cookie."""
        return self._base_dir

    @property
    def node_name(self) -> str:
        """Erlang node name, such as mrq-0123456789ab@localhost."""
        return self._node_name

    @property
    def log_file(self) -> Path:
        """File receiving the node's stdout and stderr, which carry its whole log."""
        return self._base_dir / "rabbitmq.log"

    @property
    def amqp_port(self) -> int:
        """AMQP port on 127.0.0.1, chosen by the first start() unless given."""
        if self._amqp_port is None:
            raise BrokerError(f"node {self._node_name} has no AMQP port yet: call start() first")
        return self._amqp_port

    @property
    def url(self) -> str:
        """AMQP URL of the node for the guest user."""
        return f"amqp://guest:guest@{_LOOPBACK}:{self.amqp_port}/"

    @property
    def pid(self) -> int | None:
        """Process id of rabbitmq-server, the leader of the node's process group."""
        return None if self._process is None else self._process.pid

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, timeout_s: float = 60) -> None:
        """Start the node and wait until it completes an AMQP handshake.

        Raises BrokerStartError, quoting the end of the node's log, when the node exits
        or does not complete a handshake within timeout_s. No process of the node is left
        behind then. Does nothing when the node is already running.
        """
        if self._process is not None:
            return

        self._locate_programs()
        log, log_offset = await anyio.to_thread.run_sync(self._prepare_folder)
        started_at = time.monotonic()
        try:
            await self._reclaim_orphan()
            await self._spawn(log)
            await self._wait_until_ready(timeout_s, log_offset)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._kill_and_reap()
            self._release_lock()
            raise
        finally:
            log.close()

        await anyio.to_thread.run_sync(self._snapshot_tree)
        logger.info(
            "private broker started node={} url={} pid={} startup_s={:.1f}",
            self._node_name,
            self.url,
            self.pid,
            time.monotonic() - started_at,
        )

    async def stop(self, timeout_s: float = 30) -> None:
        """Stop the node: rabbitmqctl stop, then SIGTERM and SIGKILL to its process group.

        Always kills and reaps every process of the node, also when the caller is
        cancelled midway, which is re-raised afterwards. Does nothing when not running.
        """
        process = self._process
        if process is None:
            return

        logger.info("private broker stopping node={} pid={}", self._node_name, process.pid)
        try:
            await self._stop_gracefully(process, timeout_s)
        finally:
            with anyio.CancelScope(shield=True):
                await self._kill_and_reap()
            self._release_lock()

    async def restart(self, *, stop_timeout_s: float = 30, start_timeout_s: float = 60) -> None:
        """Stop and start the node again on the same ports and data."""
        await self.stop(stop_timeout_s)
        await self.start(start_timeout_s)

    async def close_connections(self, name_contains: str | None = None, *, timeout_s: float = 30) -> int:
        """Close client connections with rabbitmqctl close_connection; return their count.

        With name_contains, only connections whose `connection_name` client property
        contains it are closed (aio-pika sends it from `client_properties`).
        Each rabbitmqctl call has the deadline timeout_s.
        """
        if self._process is None:
            raise BrokerControlError(f"node {self._node_name} is not running: call start() first")

        listing = await self._run_ctl(
            ["list_connections", "pid", "client_properties", "--silent", "--no-table-headers"],
            timeout_s,
        )
        pids = _select_connections(listing, name_contains)
        for pid in pids:
            await self._run_ctl(["close_connection", pid, "closed by mrq PrivateBroker"], timeout_s)

        logger.info(
            "private broker closed connections node={} name_contains={!r} count={}",
            self._node_name,
            name_contains,
            len(pids),
        )
        return len(pids)

    def _locate_programs(self) -> None:
        server_path = self._server_path or find_rabbitmq_server()
        if server_path is None:
            raise BrokerUnavailableError(
                f"cannot start private node {self._node_name}: rabbitmq-server was not found "
                f"on PATH or in {', '.join(map(str, SERVER_SEARCH_DIRS))}; {_FIX_HINT}"
            )

        self._server = _direct_server_script(Path(server_path))
        self._ctl = self._server.parent / "rabbitmqctl"

    def _prepare_folder(self) -> tuple[IO[bytes], int]:
        """Create the folder and files the node reads; return the open log and its size."""
        try:
            self._base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_folder()
            self._choose_ports()
            self._write_node_files()
            log = self.log_file.open("ab")
        except OSError as error:
            self._release_lock()
            raise BrokerStartError(
                f"cannot use folder {self._base_dir} for private node {self._node_name}: "
                f"{error}; choose a folder this user can create and write"
            ) from error
        except BaseException:
            self._release_lock()
            raise
        return log, log.tell()

    def _lock_folder(self) -> None:
        lock_file = self._base_dir / "broker.lock"
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(fd)
            raise BrokerStartError(
                f"folder {self._base_dir} is in use by another PrivateBroker (lock {lock_file} "
                "is held); give each PrivateBroker a folder of its own"
            ) from error
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _choose_ports(self) -> None:
        # NOTE: another program may take a chosen port before the node binds it. start()
        # then fails with the node's eaddrinuse error in its message.
        if self._amqp_port is None:
            self._amqp_port = _free_loopback_port(exclude=())
        if self._dist_port is None:
            self._dist_port = _free_loopback_port(exclude={self._amqp_port})

    def _write_node_files(self) -> None:
        base = self._base_dir
        (base / "rabbitmq.conf").write_text(
            "# Written by mrq's PrivateBroker on each start.\n"
            f"listeners.tcp.1 = {_LOOPBACK}:{self._amqp_port}\n"
        )
        # An empty env file keeps the node off /etc/rabbitmq/rabbitmq-env.conf.
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")

        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as cookie_file:
                cookie_file.write(secrets.token_hex(20).upper())

    def _common_env(self) -> dict[str, str]:
        """Environment shared by the node and rabbitmqctl. HOME selects the Erlang cookie."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("RABBITMQ_") and key != "NOTIFY_SOCKET"
        }
        env["HOME"] = str(self._base_dir)
        env["RABBITMQ_CONF_ENV_FILE"] = str(self._base_dir / "rabbitmq-env.conf")
        # Takes effect only when no epmd is running and this node or rabbitmqctl starts one.
        env["ERL_EPMD_ADDRESS"] = _LOOPBACK
        return env

    def _node_env(self) -> dict[str, str]:
        base = self._base_dir
        return self._common_env() | {
            "RABBITMQ_NODENAME": self._node_name,
            "RABBITMQ_NODE_IP_ADDRESS": _LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self._amqp_port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_DIST_ERL_ARGS,
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        }

    def _ctl_env(self) -> dict[str, str]:
        return self._common_env() | {"RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_DIST_ERL_ARGS}

    async def _spawn(self, log: IO[bytes]) -> None:
        assert self._server is not None
        logger.info(
            "private broker starting node={} amqp_port={} log_file={}",
            self._node_name,
            self._amqp_port,
            self.log_file,
        )
        try:
            self._process = await anyio.open_process(
                [str(self._server)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base_dir,
                env=self._node_env(),
                start_new_session=True,
            )
        except OSError as error:
            raise BrokerStartError(
                f"cannot run {self._server} for private node {self._node_name}: {error}"
            ) from error

    async def _wait_until_ready(self, timeout_s: float, log_offset: int) -> None:
        process = self._process
        assert process is not None
        ready = False
        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(_cancel_on_exit, process, task_group.cancel_scope)
                await self._await_handshake()
                ready = True
                task_group.cancel_scope.cancel()
        if ready:
            return

        if process.returncode is None:
            reason = f"did not accept AMQP connections within {timeout_s} s"
        else:
            reason = f"exited with code {process.returncode} before accepting AMQP connections"
        quoted = await anyio.to_thread.run_sync(_quote_log, self.log_file, log_offset)
        raise BrokerStartError(
            f"private RabbitMQ node {self._node_name} on {_LOOPBACK}:{self._amqp_port} {reason}. "
            f"From its log {self.log_file}:\n{quoted}\n"
            "Fix the cause shown in the log (such as a port in use or a full disk) and retry."
        )

    async def _await_handshake(self) -> None:
        # RabbitMQ sends no readiness signal to a plain child process, so poll the port.
        while True:
            if await probe_amqp(self.url, _PROBE_TIMEOUT_S):
                return
            await anyio.sleep(_PROBE_INTERVAL_S)

    async def _stop_gracefully(self, process: Process, timeout_s: float) -> None:
        await anyio.to_thread.run_sync(self._snapshot_tree)
        with anyio.move_on_after(timeout_s / 2):
            if process.returncode is None:
                try:
                    await self._run_ctl(["stop"], timeout_s / 2)
                except BrokerControlError as error:
                    logger.warning("private broker stop command failed error={}", error)
            await process.wait()
        if process.returncode is not None:
            return

        logger.warning("private broker escalating node={} signal=SIGTERM", self._node_name)
        await anyio.to_thread.run_sync(self._snapshot_tree)
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(timeout_s / 2):
            await process.wait()

    async def _kill_and_reap(self) -> None:
        """SIGKILL the node's group and its other descendants, then reap. Callers shield it."""
        process = self._process
        if process is None:
            return

        with anyio.move_on_after(_REAP_TIMEOUT_S):
            if process.returncode is None:
                logger.warning("private broker escalating node={} signal=SIGKILL", self._node_name)
                await anyio.to_thread.run_sync(self._snapshot_tree)
                _signal_group(process, signal.SIGKILL)
            await process.wait()
            await anyio.to_thread.run_sync(self._kill_leftovers)

        self._process = None
        if process.returncode is None:
            logger.error(
                "private broker gave up reaping node={} pid={} timeout_s={}",
                self._node_name,
                process.pid,
                _REAP_TIMEOUT_S,
            )
            return
        logger.info(
            "private broker stopped node={} pid={} exit_code={}",
            self._node_name,
            process.pid,
            process.returncode,
        )

    def _snapshot_tree(self) -> None:
        """Record the node's processes, since erl_child_setup leaves the process group."""
        if self._process is None:
            return
        try:
            leader = psutil.Process(self._process.pid)
            processes = [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            self._tree.setdefault(process.pid, process)

    def _kill_leftovers(self) -> None:
        leftovers = _kill_processes(list(self._tree.values()))
        if leftovers:
            logger.warning(
                "private broker killed leftover processes node={} pids={}",
                self._node_name,
                leftovers,
            )
        self._tree.clear()

    async def _reclaim_orphan(self) -> None:
        """Stop a node of this folder that an owner left running when it died."""
        orphan = await anyio.to_thread.run_sync(self._find_orphan)
        if orphan is None:
            return

        logger.warning("private broker stopping orphan node={} pid={}", self._node_name, orphan.pid)
        try:
            await self._run_ctl(["stop"], _ORPHAN_STOP_TIMEOUT_S)
        except BrokerControlError as error:
            logger.warning("private broker orphan stop command failed error={}", error)
        await anyio.to_thread.run_sync(_kill_orphan, orphan)

    def _find_orphan(self) -> psutil.Process | None:
        try:
            pid = int((self._base_dir / "rabbitmq.pid").read_text().strip())
            process = psutil.Process(pid)
            node_name = process.environ().get("RABBITMQ_NODENAME")
        except (OSError, ValueError, psutil.Error):
            return None
        return process if node_name == self._node_name else None

    async def _run_ctl(self, args: list[str], timeout_s: float) -> str:
        """Run rabbitmqctl against this node and return its stdout."""
        assert self._ctl is not None
        command = [str(self._ctl), "-n", self._node_name, *args]
        try:
            with anyio.fail_after(timeout_s):
                result = await anyio.run_process(
                    command,
                    check=False,
                    stdin=subprocess.DEVNULL,
                    cwd=self._base_dir,
                    env=self._ctl_env(),
                )
        except TimeoutError as error:
            raise BrokerControlError(
                f"rabbitmqctl {args[0]} on node {self._node_name} timed out after {timeout_s} s"
            ) from error
        except OSError as error:
            raise BrokerControlError(f"cannot run {self._ctl}: {error}") from error

        if result.returncode != 0:
            output = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise BrokerControlError(
                f"rabbitmqctl {args[0]} on node {self._node_name} failed with exit code "
                f"{result.returncode}: {output[-2000:]}"
            )
        return result.stdout.decode(errors="replace")


async def _cancel_on_exit(process: Process, scope: anyio.CancelScope) -> None:
    await process.wait()
    scope.cancel()


def _signal_group(process: Process, signum: int) -> None:
    # A process group id stays reserved until its leader is reaped, which sets returncode.
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _kill_processes(processes: list[psutil.Process]) -> list[int]:
    """SIGKILL the processes still running and wait until they are gone; return their pids."""
    killed = []
    for process in processes:
        if _is_running(process):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
                killed.append(process)
    _wait_gone(killed, _REAP_TIMEOUT_S)
    return [process.pid for process in killed]


def _is_running(process: psutil.Process) -> bool:
    # A zombie has exited. One whose parent died stays until init reaps it, if ever.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> None:
    # psutil.wait_procs would wait for an unreaped zombie until timeout_s, but this does not.
    deadline = time.monotonic() + timeout_s
    while any(map(_is_running, processes)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_orphan(beam: psutil.Process) -> None:
    """Wait for an orphan node's processes to end after `stop`, then kill the rest."""
    members = [beam]
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        members.extend(beam.children(recursive=True))
        members.append(psutil.Process(os.getpgid(beam.pid)))
    _wait_gone(members, _REAP_TIMEOUT_S)
    _kill_processes(members)
