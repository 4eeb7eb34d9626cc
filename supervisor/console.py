"""What `mrq-supervisor start` prints for people: progress while starting, the table of services."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

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

# Output that goes to a file or a pipe keeps whole lines instead of an 80-column layout.
console = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)


def state_text(state: str) -> str:
    style = STATE_STYLES.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def services_table(rows: Iterable[dict[str, Any]], *, title: str) -> Table:
    """Build the start-up table: one row per service, with its instances' pids and routes."""
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
    console.print(text)
