"""`mrq-supervisor`: start the supervisor, and steer every node over RabbitMQ."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from supervisor.config import DEFAULT_CONFIG_FILE

app = typer.Typer(
    name="mrq-supervisor",
    help="Run, watch and steer the services of an mrq application.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="Path of supervisor.toml.", show_default=True),
]


@app.callback()
def _root() -> None:
    """Run, watch and steer the services of an mrq application."""


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"mrq-supervisor: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def start(config: ConfigOption = Path(DEFAULT_CONFIG_FILE)) -> None:
    """Start every service of supervisor.toml and supervise them until SIGTERM or SIGINT."""
    import uvloop
    from loguru import logger

    from supervisor.broker import BrokerError
    from supervisor.config import ConfigError, load_config
    from supervisor.keys import KeyError_
    from supervisor.logsetup import configure
    from supervisor.node import Node, StartupError

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
        return
    log_file = configure(loaded.supervisor)
    logger.info("supervisor starting node={} config={} log={}", loaded.supervisor.node, config, log_file)
    try:
        code = uvloop.run(Node(loaded).run())
    except (StartupError, BrokerError, KeyError_) as exc:
        logger.error("supervisor could not start: {}", exc)
        _fail(str(exc))
        return
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="mrq-supervisor")


if __name__ == "__main__":
    main()
