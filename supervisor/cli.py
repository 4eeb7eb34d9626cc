"""`mrq-supervisor`: start the supervisor, and steer every node over RabbitMQ.

Every command except `start` is a client: it reads the broker and the cluster
key from supervisor.toml (or the MRQ_* variables), sends a signed command to
one node (`--node`) or to all, and reports which known nodes sent no reply.
Exit codes: 0 on success, 1 when anything asked for failed or was not found,
2 on a usage error.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from supervisor.config import DEFAULT_CONFIG_FILE

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

    from sdk.connection import Broker
    from sdk.wire import Event
    from supervisor.config import SupervisorSettings
    from supervisor.ctlclient import ControlClient, Gathered

T = TypeVar("T")

app = typer.Typer(
    name="mrq-supervisor",
    help="Run, watch and steer the services of an mrq application.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Path of supervisor.toml [default: ./{DEFAULT_CONFIG_FILE}, else the MRQ_* variables].",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document (JSON lines with -f).")]
NodeOption = Annotated[
    str | None, typer.Option("--node", help="Send the command to this node only [default: every node].")
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help="Seconds to wait for each node's reply.", show_default=True),
]
WaitOption = Annotated[
    float,
    typer.Option("--wait", min=0.0, help="Seconds to wait for the result after a node accepted the command."),
]
TargetsArgument = Annotated[list[str] | None, typer.Argument(help="SERVICE or SERVICE:INSTANCE.")]
AllOption = Annotated[bool, typer.Option("--all", help="Every instance of every service.")]

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_WAIT_S = 120.0
WATCH_INTERVAL_S = 1.0
LOG_POLL_INTERVAL_S = 1.0
_STATE_RANK = {"fatal": 0, "unhealthy": 1, "backoff": 2, "exited": 3}


class CommandFailed(Exception):
    """A client command failed in an expected way; the message is the one line to print."""


@app.callback()
def _root() -> None:
    """Run, watch and steer the services of an mrq application."""


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"mrq-supervisor: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def start(
    targets: TargetsArgument = None,
    all_: AllOption = False,
    node: NodeOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    wait: WaitOption = DEFAULT_WAIT_S,
    config: ConfigOption = None,
) -> None:
    """Without arguments: run the supervisor. With SERVICE[:INSTANCE]... or --all: start those instances.

    The supervisor starts every service of supervisor.toml and supervises them until
    SIGTERM or SIGINT. Starting instances also clears `fatal`, and waits until they run.
    """
    if targets or all_:
        _action("start", targets or [], all_, node, timeout, wait, config, _RUNNING)
        return
    _run_supervisor(config or Path(DEFAULT_CONFIG_FILE))


def _run_supervisor(path: Path) -> None:
    import uvloop
    from loguru import logger

    from supervisor.broker import BrokerError
    from supervisor.config import ConfigError, load_config
    from supervisor.control import ControlServer
    from supervisor.keys import KeyError_
    from supervisor.logsetup import configure
    from supervisor.node import Node, StartupError, prepare_state_dir
    from supervisor.registry import RegistryError

    try:
        loaded = load_config(path)
        # Before logging starts: the log file lives in the state folder.
        prepare_state_dir(loaded.supervisor.state_dir)
    except (ConfigError, StartupError) as exc:
        _fail(str(exc))
        return
    log_file = configure(loaded.supervisor)
    logger.info("supervisor starting node={} config={} log={}", loaded.supervisor.node, path, log_file)
    node = Node(loaded)
    node.configure_logging = configure
    node.extensions.append(ControlServer())
    if loaded.supervisor.dashboard_address() is not None:
        from supervisor.dashboard import Dashboard

        node.extensions.append(Dashboard())
    expected = (StartupError, BrokerError, KeyError_, RegistryError)
    try:
        code = uvloop.run(node.run())
    except expected as exc:
        logger.error("supervisor could not start: {}", exc)
        _fail(str(exc))
        return
    except BaseExceptionGroup as group:
        matched, _rest = group.split(expected)
        if matched is None:
            raise
        first = _first_leaf(matched)
        logger.error("supervisor could not start: {}", first)
        _fail(str(first))
        return
    raise typer.Exit(code)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# --- the client side ------------------------------------------------------------------------


@dataclass
class Session:
    """A connected client: settings, broker, key and the command channel."""

    settings: SupervisorSettings
    broker: Broker
    key: bytes
    client: ControlClient
    as_json: bool
    err: Console = field(repr=False)


def _configure_logging() -> None:
    from loguru import logger

    logger.remove()
    logger.enable("sdk")
    logger.enable("supervisor")
    logger.add(sys.stderr, level="WARNING", format="mrq-supervisor: {message}")


def _run(
    config: Path | None,
    as_json: bool,
    body: Callable[[Session], Awaitable[int]],
    *,
    until_interrupted: bool = False,
) -> None:
    """Connect, run `body`, disconnect, and exit with its code; expected errors print one line.

    Ctrl-C ends a command that runs `until_interrupted` (--watch, -f) with exit code 0,
    and any other command with 130.
    """
    import aiormq
    import anyio

    from sdk.errors import MrqError

    _configure_logging()
    try:
        code = anyio.run(_with_session, config, as_json, body, backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        code = 0 if until_interrupted else 130
    except (CommandFailed, MrqError) as exc:
        _fail(str(exc))
        return
    except (aiormq.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
        _fail(f"the broker failed the request: {exc or type(exc).__name__}; check the broker and retry")
        return
    raise typer.Exit(code)


async def _with_session(config: Path | None, as_json: bool, body: Callable[[Session], Awaitable[int]]) -> int:
    from rich.console import Console

    from supervisor.ctlclient import ControlClient, connect, load_client_settings

    settings = load_client_settings(config or Path(DEFAULT_CONFIG_FILE), explicit=config is not None)
    broker, key = await connect(settings)
    try:
        client = ControlClient(broker, key)
        await client.start()
        try:
            return await body(Session(settings, broker, key, client, as_json, Console(stderr=True)))
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    finally:
        with contextlib.suppress(Exception):
            await broker.close()


@contextlib.contextmanager
def _spinner(session: Session, text: str) -> Iterator[None]:
    """Show a spinner on stderr while waiting, when stderr is a terminal."""
    if not session.err.is_terminal:
        yield
        return
    with session.err.status(text, spinner="dots"):
        yield


async def _ask(
    session: Session,
    name: str,
    args: dict[str, Any],
    *,
    node: str | None,
    timeout_s: float,
    wait_s: float = DEFAULT_WAIT_S,
) -> Gathered:
    """Send a command and gather the replies; raise CommandFailed when no node is running."""
    from sdk.errors import NoRoute

    where = f"node {node}" if node else "every node"
    try:
        with _spinner(session, f"{name}: waiting for {where}"):
            gathered = await session.client.gather(name, args, node=node, timeout_s=timeout_s, wait_s=wait_s)
    except NoRoute:
        exchange = session.settings.control_exchange
        if node:
            raise CommandFailed(
                f"{name} failed: node {node!r} is not running (no supervisor of that name consumes "
                f"commands on exchange {exchange!r}); start it, or check --node and the exchange"
            ) from None
        raise CommandFailed(
            f"{name} failed: no supervisor is running on this broker with exchange {exchange!r}; "
            "start one with `mrq-supervisor start`, or check the broker URL and the exchange"
        ) from None
    if not gathered.replies and not gathered.missing and not gathered.unfinished:
        # The command was routed, so a supervisor consumes it, but none replied.
        raise CommandFailed(
            f"{name} failed: no supervisor replied within {timeout_s:g} s although one consumes "
            "commands on this exchange, and the command expired, so it will not run later; the "
            "supervisor may be overloaded or stopped (SIGSTOP), or this CLI may use another key "
            "(the node then logs `command rejected reason=bad signature`); retry with a longer --timeout"
        )
    return gathered


def _report_gaps(gathered: Gathered, timeout_s: float, wait_s: float) -> bool:
    """Print the nodes that sent no reply or failed; return True when there were any."""
    failed = False
    for name in gathered.missing:
        typer.echo(
            f"mrq-supervisor: node {name} did not answer within {timeout_s:g} s, and the command "
            "expired, so it will not run there later; check that its supervisor runs, is not "
            "stopped or overloaded, and uses the same cluster key (a node stays known until it "
            "stops cleanly or 24 h pass)",
            err=True,
        )
        failed = True
    for name in gathered.unfinished:
        typer.echo(
            f"mrq-supervisor: node {name} accepted the command but sent no result within {wait_s:g} s; "
            "see `mrq-supervisor events` for what happened",
            err=True,
        )
        failed = True
    for name, reply in sorted(gathered.replies.items()):
        if not reply.ok:
            typer.echo(f"mrq-supervisor: node {name}: {reply.error}", err=True)
            failed = True
    return failed


def _results(gathered: Gathered) -> dict[str, dict[str, Any]]:
    """Return each node's successful result, without the `known_nodes` bookkeeping."""
    results = {}
    for name, reply in sorted(gathered.replies.items()):
        if reply.ok and isinstance(reply.result, dict):
            results[name] = {k: v for k, v in reply.result.items() if k != "known_nodes"}
    return results


def _json_document(gathered: Gathered, *, per_node: bool = True, **extra: Any) -> dict[str, Any]:
    """Return the --json document: `extra`, each node's result (or only the names), and the gaps."""
    errors = {name: reply.error for name, reply in gathered.replies.items() if not reply.ok}
    results = _results(gathered)
    return {
        **extra,
        "nodes": results if per_node else sorted(results),
        "errors": errors,
        "missing": gathered.missing,
        "unfinished": gathered.unfinished,
    }


def _print_json(document: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_json_line(document: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS).decode() + "\n")
    sys.stdout.flush()


def _stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


# --- status ---------------------------------------------------------------------------------


@app.command()
def status(
    services: Annotated[list[str] | None, typer.Argument(help="Show only these services.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every second until Ctrl-C.")] = False,
    node: NodeOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Show every instance: state, pid, uptime, restarts, CPU, memory, heartbeat, last exit."""

    async def body(session: Session) -> int:
        if watch and not as_json:
            return await _watch_status(session, services or [], node, timeout)
        gathered, failed = await _gather_status(session, services or [], node, timeout)
        if as_json:
            _print_json(_json_document(gathered))
        else:
            _stdout().print(_status_table(gathered))
        return 1 if failed else 0

    _run(config, as_json, body, until_interrupted=watch)


async def _gather_status(
    session: Session, services: list[str], node: str | None, timeout_s: float
) -> tuple[Gathered, bool]:
    args = {"services": services or None, "missing_ok": True}
    gathered = await _ask(session, "status", args, node=node, timeout_s=timeout_s)
    failed = _report_gaps(gathered, timeout_s, DEFAULT_WAIT_S)
    found = {row["service"] for result in _results(gathered).values() for row in result["instances"]}
    found |= {name for result in _results(gathered).values() for name in result.get("services", {})}
    for name in services:
        if name not in found:
            typer.echo(
                f"mrq-supervisor: service {name!r} not found on any node that answered; "
                "check the name with `mrq-supervisor status`",
                err=True,
            )
            failed = True
    return gathered, failed


async def _watch_status(session: Session, services: list[str], node: str | None, timeout_s: float) -> int:
    import anyio
    from rich.live import Live

    with Live(console=_stdout(), auto_refresh=False) as live:
        while True:
            gathered, _failed = await _gather_status(session, services, node, timeout_s)
            live.update(_status_table(gathered, title_suffix=time.strftime(" at %H:%M:%S")), refresh=True)
            await anyio.sleep(WATCH_INTERVAL_S)


def _status_rows(gathered: Gathered) -> list[dict[str, Any]]:
    rows = [row for result in _results(gathered).values() for row in result.get("instances", [])]
    return sorted(
        rows,
        key=lambda r: (_STATE_RANK.get(r["state"], 9), r["node"], r["service"], r["instance"]),
    )


def _status_table(gathered: Gathered, title_suffix: str = "") -> Table:
    from rich.table import Table

    from supervisor.console import state_text

    table = Table(title=f"Instances{title_suffix}", title_justify="left", header_style="bold")
    headers = ("node", "service", "instance", "state", "pid", "uptime", "restarts", "cpu")
    for column in (*headers, "memory", "heartbeat", "loop lag", "last exit"):
        table.add_column(column)
    for row in _status_rows(gathered):
        table.add_row(
            row["node"],
            row["service"],
            str(row["instance"]),
            state_text(row["state"]),
            _text(row["pid"]),
            _duration(row["uptime_s"]),
            str(row["restarts"]),
            f"{row['cpu_percent']:.1f}%" if row.get("cpu_percent") is not None else "-",
            _bytes(row["rss_bytes"]) if row.get("rss_bytes") is not None else "-",
            _duration(row["heartbeat_age_s"]),
            f"{row['loop_lag_ms']:.1f} ms" if row.get("loop_lag_ms") is not None else "-",
            _last_exit(row),
        )
    return table


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _last_exit(row: dict[str, Any]) -> str:
    if not row.get("last_exit"):
        return "-"
    reason = row.get("last_exit_reason")
    text = str(row["last_exit"])
    return f"{text} ({reason})" if reason and reason != text else text


# --- start, stop, restart, scale ------------------------------------------------------------


def _action(
    name: str,
    targets: list[str],
    all_: bool,
    node: str | None,
    timeout_s: float,
    wait_s: float,
    config: Path | None,
    wanted: frozenset[str],
) -> None:
    if not targets and not all_:
        _fail(f"{name}: name at least one SERVICE or SERVICE:INSTANCE, or pass --all", code=2)

    async def body(session: Session) -> int:
        args = {"targets": targets, "all": all_, "missing_ok": True}
        gathered = await _ask(session, name, args, node=node, timeout_s=timeout_s, wait_s=wait_s)
        failed = _report_gaps(gathered, timeout_s, wait_s)
        instances = [row for result in _results(gathered).values() for row in result.get("instances", [])]
        if not gathered.missing and not gathered.unfinished:
            # A node that sent no result may run the target.
            failed |= _report_unknown_targets(targets, instances)
        console = _stdout()
        for node_name, result in _results(gathered).items():
            for row in result.get("instances", []):
                state = row["state"]
                pid = f" pid {row['pid']}" if row.get("pid") else ""
                console.print(f"{node_name}  {row['service']}:{row['instance']}  {state}{pid}")
                if state not in wanted:
                    failed = True
            for stopped in result.get("failed", []):
                typer.echo(f"mrq-supervisor: node {node_name}: {stopped['error']}", err=True)
                failed = True
        return 1 if failed else 0

    _run(config, False, body)


def _report_unknown_targets(targets: list[str], instances: list[dict[str, Any]]) -> bool:
    found = {(row["service"], row["instance"]) for row in instances}
    services = {service for service, _index in found}
    unknown = []
    for target in targets:
        service, _, index = target.partition(":")
        if service not in services or (index.isdigit() and (service, int(index)) not in found):
            unknown.append(target)
    for target in unknown:
        typer.echo(
            f"mrq-supervisor: {target} not found on any node that answered; "
            "check the name with `mrq-supervisor status`",
            err=True,
        )
    return bool(unknown)


_RUNNING = frozenset({"running"})
_STOPPED = frozenset({"stopped", "exited"})


@app.command()
def stop(
    targets: TargetsArgument = None,
    all_: AllOption = False,
    node: NodeOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    wait: WaitOption = DEFAULT_WAIT_S,
    config: ConfigOption = None,
) -> None:
    """Stop instances and wait until their processes are gone."""
    _action("stop", targets or [], all_, node, timeout, wait, config, _STOPPED)


@app.command()
def restart(
    targets: TargetsArgument = None,
    all_: AllOption = False,
    node: NodeOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    wait: WaitOption = DEFAULT_WAIT_S,
    config: ConfigOption = None,
) -> None:
    """Restart instances, one instance of a service at a time, so the service keeps consuming."""
    _action("restart", targets or [], all_, node, timeout, wait, config, _RUNNING)


@app.command()
def scale(
    service: Annotated[str, typer.Argument(help="The service to scale.")],
    replicas: Annotated[int, typer.Argument(min=0, max=256, help="The number of instances to run.")],
    node: NodeOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    wait: WaitOption = DEFAULT_WAIT_S,
    config: ConfigOption = None,
) -> None:
    """Run REPLICAS instances of SERVICE on each node that runs it (until the next restart or reload)."""

    async def body(session: Session) -> int:
        args = {"service": service, "replicas": replicas, "missing_ok": True}
        gathered = await _ask(session, "scale", args, node=node, timeout_s=timeout, wait_s=wait)
        failed = _report_gaps(gathered, timeout, wait)
        scaled = {n: r for n, r in _results(gathered).items() if r.get("found", True)}
        if not scaled and not failed:
            typer.echo(f"mrq-supervisor: service {service!r} not found on any node that answered", err=True)
            failed = True
        for node_name, result in scaled.items():
            _stdout().print(
                f"{node_name}  {service}: {result['replicas_before']} -> {result['replicas']} instances"
            )
        return 1 if failed else 0

    _run(config, False, body)


# --- logs -----------------------------------------------------------------------------------


@app.command()
def logs(
    target: Annotated[str, typer.Argument(help="SERVICE or SERVICE:INSTANCE.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print new lines until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, max=10_000, help="Lines to show.")] = 50,
    node: NodeOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Show an instance's log: from the files when it runs on this host's node, else through its node."""

    async def body(session: Session) -> int:
        local = await _local_log_paths(session.settings, target, node)
        if local:
            return await _local_logs(local, lines, follow, as_json)
        return await _remote_logs(session, target, lines, follow, as_json, node, timeout)

    _run(config, as_json, body, until_interrupted=follow)


async def _local_log_paths(settings: SupervisorSettings, target: str, node: str | None) -> dict[str, Path]:
    """Return instance name to log file for a target found in the registry of this host's node."""
    import anyio

    from supervisor import logfiles
    from supervisor.registry import RegistryError, read_snapshot, registry_path

    if node not in (None, settings.node):
        return {}
    service, _, index = target.partition(":")
    try:
        snapshot = await anyio.to_thread.run_sync(read_snapshot, registry_path(settings.state_dir))
    except RegistryError:
        return {}
    indexes = sorted(i.index for i in snapshot.instances if i.service == service)
    if index.isdigit():
        indexes = [i for i in indexes if i == int(index)]
    paths = {}
    for i in indexes:
        paths[f"{service}:{i}"] = logfiles.instance_log_path(settings.state_dir, service, i)
    return paths


async def _local_logs(paths: dict[str, Path], lines: int, follow: bool, as_json: bool) -> int:
    import anyio

    from supervisor import logfiles

    tails = {name: await logfiles.tail(path, lines) for name, path in paths.items()}
    _print_logs(tails, as_json, prefix=len(paths) > 1)
    if not follow:
        return 0
    _following("the log files " + ", ".join(str(path) for path in paths.values()))
    async with anyio.create_task_group() as task_group:
        for name, path in paths.items():
            task_group.start_soon(_follow_file, name, path, as_json, len(paths) > 1)
    return 0


async def _follow_file(name: str, path: Path, as_json: bool, prefix: bool) -> None:
    from supervisor import logfiles

    generator = logfiles.follow(path)
    async with contextlib.aclosing(generator):
        async for line in generator:
            _print_log_line(name, line, as_json, prefix)


def _print_logs(tails: dict[str, list[str]], as_json: bool, *, prefix: bool) -> None:
    if as_json:
        _print_json({"logs": [{"instance": name, "lines": text} for name, text in tails.items()]})
        return
    for name, text in tails.items():
        for line in text:
            _print_log_line(name, line, False, prefix)


def _print_log_line(name: str, line: str, as_json: bool, prefix: bool) -> None:
    if as_json:
        _print_json_line({"instance": name, "line": line})
        return
    sys.stdout.write(f"{name} | {line}\n" if prefix else line + "\n")
    sys.stdout.flush()


async def _remote_logs(
    session: Session, target: str, lines: int, follow: bool, as_json: bool, node: str | None, timeout_s: float
) -> int:
    import anyio

    args: dict[str, Any] = {"target": target, "lines": lines, "missing_ok": True}
    gathered = await _ask(session, "logs", args, node=node, timeout_s=timeout_s)
    failed = _report_gaps(gathered, timeout_s, DEFAULT_WAIT_S)
    found = {n: r for n, r in _results(gathered).items() if r.get("found", True)}
    if not found:
        if not failed:
            typer.echo(f"mrq-supervisor: {target} not found on any node that answered", err=True)
        return 1
    entries = [(n, entry) for n, result in found.items() for entry in result["logs"]]
    prefix = len(entries) > 1
    _print_logs({f"{n}/{e['instance']}": e["lines"] for n, e in entries}, as_json, prefix=prefix)
    if not follow:
        return 1 if failed else 0
    offsets = {n: {e["instance"]: e["offset"] for _n, e in entries if _n == n} for n in found}
    _following(f"the log of {target}")
    while True:
        await anyio.sleep(LOG_POLL_INTERVAL_S)
        for node_name, node_offsets in offsets.items():
            args = {"target": target, "lines": 0, "offsets": node_offsets}
            polled = await _ask(session, "logs", args, node=node_name, timeout_s=timeout_s)
            for result in _results(polled).values():
                for entry in result["logs"]:
                    node_offsets[entry["instance"]] = entry["offset"]
                    for line in entry["lines"]:
                        _print_log_line(f"{node_name}/{entry['instance']}", line, as_json, prefix)


# --- events ---------------------------------------------------------------------------------


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print new events until Ctrl-C.")] = False,
    service: Annotated[str | None, typer.Option("--service", help="Only this service's events.")] = None,
    limit: Annotated[int, typer.Option("-n", "--limit", min=0, max=10_000, help="Events to show.")] = 20,
    node: NodeOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Show the supervisor events: starts, exits with code or signal, restarts, unhealthy, fatal."""

    async def body(session: Session) -> int:
        if follow:
            return await _follow_events(session, service, node, as_json)
        args = {"limit": limit, "service": service}
        gathered = await _ask(session, "events", args, node=node, timeout_s=timeout)
        failed = _report_gaps(gathered, timeout, DEFAULT_WAIT_S)
        rows = (
            sorted(
                (event for result in _results(gathered).values() for event in result["events"]),
                key=lambda e: e["time"],
            )[-limit:]
            if limit
            else []
        )
        if as_json:
            _print_json(_json_document(gathered, per_node=False, events=rows))
        else:
            console = _stdout()
            for row in rows:
                console.print(_event_line(row), markup=False)
        return 1 if failed else 0

    _run(config, as_json, body, until_interrupted=follow)


async def _follow_events(session: Session, service: str | None, node: str | None, as_json: bool) -> int:
    from supervisor.ctlclient import follow_events

    stream: AsyncIterator[Event] = follow_events(
        session.broker, session.key, on_ready=lambda: _following("the events of every node")
    )
    console = _stdout()
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for event in stream:
            if service is not None and event.service != service:
                continue
            if node is not None and event.node != node:
                continue
            row = event.model_dump(mode="json")
            if as_json:
                _print_json_line(row)
            else:
                console.print(_event_line(row), markup=False)
    return 0


def _following(what: str) -> None:
    """Say on stderr that a follow has started, so that a reader knows nothing later is missed."""
    typer.echo(f"mrq-supervisor: following {what}; press Ctrl-C to stop", err=True)


def _event_line(row: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
    where = row["service"] if row.get("instance") is None else f"{row['service']}:{row['instance']}"
    data = " ".join(f"{key}={value}" for key, value in sorted((row.get("data") or {}).items()))
    subject = f" {where}" if row.get("service") else ""
    return f"{stamp} {row['node']} {row['kind']}{subject} {data}".rstrip()


# --- send, call, ping -----------------------------------------------------------------------


def _parse_body(text: str) -> Any:
    """Return the JSON value of `text`, or the text itself when it is not JSON."""
    import orjson

    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


@app.command()
def send(
    route: Annotated[str, typer.Argument(help="SERVICE.ROUTE, or SERVICE for its default route.")],
    body: Annotated[str, typer.Argument(help="The message: JSON when it parses as JSON, else text.")],
    config: ConfigOption = None,
) -> None:
    """Send a message to a route without waiting for a reply."""

    async def run(session: Session) -> int:
        from sdk.messenger import Messenger

        messenger = Messenger(session.broker)
        await messenger.start()
        await messenger.send(route, _parse_body(body))
        _stdout().print(f"sent to {route}", markup=False)
        return 0

    _run(config, False, run)


@app.command()
def call(
    route: Annotated[str, typer.Argument(help="SERVICE.ROUTE, or SERVICE for its default route.")],
    body: Annotated[str, typer.Argument(help="The request: JSON when it parses as JSON, else text.")],
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Seconds to wait for the reply.")
    ] = 10.0,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Call a route and print its reply and the round-trip time."""

    async def run(session: Session) -> int:
        from sdk.errors import NoRoute, RemoteError, RpcTimeout
        from sdk.messenger import Messenger

        messenger = Messenger(session.broker)
        await messenger.start()
        began = time.perf_counter()
        try:
            reply = await messenger.call(route, _parse_body(body), timeout=timeout)
        except (RemoteError, RpcTimeout, NoRoute) as exc:
            rtt_ms = round((time.perf_counter() - began) * 1000, 2)
            if as_json:
                _print_json({"route": route, "ok": False, "error": _error_json(exc), "rtt_ms": rtt_ms})
            raise CommandFailed(f"call {route} failed: {exc}") from None
        rtt_ms = round((time.perf_counter() - began) * 1000, 2)
        if as_json:
            _print_json({"route": route, "ok": True, "reply": reply, "rtt_ms": rtt_ms})
        else:
            _print_value(reply)
            typer.echo(f"round trip: {rtt_ms:.2f} ms", err=True)
        return 0

    _run(config, as_json, run)


def _error_json(exc: Exception) -> dict[str, Any]:
    from sdk.errors import RemoteError

    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RemoteError):
        error.update(remote_type=exc.type, remote_message=exc.message, errors=exc.errors)
    return error


def _print_value(value: Any) -> None:
    if isinstance(value, str):
        sys.stdout.write(value + "\n")
    else:
        _print_json(value)


@app.command()
def ping(
    service: Annotated[str | None, typer.Argument(help="Ping only this service.")] = None,
    node: NodeOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Call the built-in `_ping` route of every Python service, through the node that runs it."""

    async def body(session: Session) -> int:
        args = {"service": service, "missing_ok": True}
        gathered = await _ask(session, "ping", args, node=node, timeout_s=timeout)
        failed = _report_gaps(gathered, timeout, DEFAULT_WAIT_S)
        pings = [
            {"node": n, **p} for n, result in _results(gathered).items() for p in result.get("pings", [])
        ]
        if service is not None and not pings and not failed:
            typer.echo(f"mrq-supervisor: service {service!r} not found on any node that answered", err=True)
            failed = True
        failed |= any(not p["ok"] for p in pings)
        if as_json:
            _print_json(_json_document(gathered, per_node=False, pings=pings))
        else:
            _stdout().print(_ping_table(pings))
        return 1 if failed else 0

    _run(config, as_json, body)


def _ping_table(pings: list[dict[str, Any]]) -> RenderableType:
    from rich.table import Table

    table = Table(title="Ping", title_justify="left", header_style="bold")
    for column in ("node", "service", "sdk service", "result", "round trip"):
        table.add_column(column)
    for p in pings:
        result = "[green]ok[/]" if p["ok"] else f"[bold red]{p['error']['type']}[/]"
        table.add_row(p["node"], p["service"], p["sdk_service"], result, f"{p['rtt_ms']:.2f} ms")
    return table


# --- reload, shutdown -----------------------------------------------------------------------


# The keys of a reload summary, with the words that the CLI prints for them.
_RELOAD_LABELS = {
    "added": "added",
    "removed": "removed",
    "changed": "changed",
    "scaled": "scaled",
    "settings": "settings applied",
    "ignored": "settings that need a supervisor restart",
}


@app.command()
def reload(
    node: NodeOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    wait: WaitOption = DEFAULT_WAIT_S,
    config: ConfigOption = None,
) -> None:
    """Make each node (or one) apply its changed supervisor.toml."""

    async def body(session: Session) -> int:
        gathered = await _ask(session, "reload", {}, node=node, timeout_s=timeout, wait_s=wait)
        failed = _report_gaps(gathered, timeout, wait)
        for node_name, result in _results(gathered).items():
            changes = ", ".join(
                f"{label}: {value}" for key, label in _RELOAD_LABELS.items() if (value := result.get(key))
            )
            _stdout().print(f"{node_name}  reloaded  {changes or 'nothing changed'}", markup=False)
        return 1 if failed else 0

    _run(config, False, body)


@app.command()
def shutdown(
    node: NodeOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Stop a node's supervisor and all its instances; without --node, every node."""
    if node is None and not yes:
        confirmed = sys.stdin.isatty() and typer.confirm("Stop every node and all their services?")
        if not confirmed:
            _fail("shutdown of every node not confirmed; pass --yes, or --node NODE for one node")

    async def body(session: Session) -> int:
        gathered = await _ask(session, "shutdown", {}, node=node, timeout_s=timeout)
        failed = _report_gaps(gathered, timeout, DEFAULT_WAIT_S)
        for node_name in _results(gathered):
            _stdout().print(f"{node_name}  stopping", markup=False)
        return 1 if failed else 0

    _run(config, False, body)


def _restore_ignored_signals() -> None:
    """Undo an inherited SIG_IGN (a shell's background job ignores SIGINT, nohup SIGHUP).

    An ignored signal stays ignored across exec, so every instance would inherit
    it, and Ctrl-C would not end `--watch` or `-f`.
    """
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) == signal.SIG_IGN:
            handler = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, handler)


def main() -> None:
    _restore_ignored_signals()
    app(prog_name="mrq-supervisor")


if __name__ == "__main__":
    main()
