"""What `mrq-supervisor start` prints for people: progress while starting, the table of services."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

STATE_STYLES = {
    "running": "green",
    "starting": "cyan",
    "backoff": "yellow",
    "stopping": "yellow",
    "unhealthy": "bold red",
    "fatal": "bold white on red",
    "exited": "magenta",
    "stopped": "dim",
}


@functools.cache
def console() -> Console:
    """Return the console of stdout, importing rich on first use.

    rich takes about 45 ms to import. A start-up without a terminal and without known
    services needs it only for the table at the end, so it is not imported before the
    instances start.
    """
    from rich.console import Console

    # Output that goes to a file or a pipe keeps whole lines instead of an 80-column layout.
    return Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)


def state_text(state: str) -> str:
    style = STATE_STYLES.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def services_table(rows: Iterable[dict[str, Any]], *, title: str) -> Table:
    """Build the start-up table: one row per service, with its instances' pids and routes."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for column in ("service", "instances", "state", "pids", "routes", "ready in", "ping"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["service"],
            row["instances"],
            state_text(row["state"]),
            row["pids"],
            row["routes"],
            row["ready"],
            row["ping"],
        )
    return table


def print_line(text: str) -> None:
    """Print one line of plain text (no rich markup) to stdout."""
    print(text, flush=True)
