"""Markdown for benchmark results: one section per benchmark, replaced in place in BENCHMARKS.md.

Each section sits between `<!-- bench:NAME start -->` and
`<!-- bench:NAME end -->`, so a run of some benchmarks rewrites their
sections and leaves the rest of the file, other sections included, as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import summary_line
from bench.results import BenchResult, Metric

NEW_FILE_HEADER = (
    "# Benchmarks\n\nRecorded by `scripts/bench`. Each section below is rewritten by the run it shows.\n"
)


@dataclass(frozen=True)
class RunInfo:
    """The command, start time, duration, machine and load average of one benchmark run."""

    command: str
    started_at: str
    duration_s: float
    machine: dict[str, Any]
    load_average: tuple[float, float, float]
    quick: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 1),
            "machine": self.machine,
            "load_average": list(self.load_average),
            "quick": self.quick,
        }


def start_marker(name: str) -> str:
    return f"<!-- bench:{name} start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name} end -->"


def format_number(value: float) -> str:
    """Format a figure with about three significant digits and thousands separators."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _table(result: BenchResult) -> list[str]:
    variants = list(result.variants)
    ratio_variants = [v for v in variants if v != result.baseline]
    ratio_headers = [f"{v}/{result.baseline}" for v in ratio_variants] if result.baseline else []
    header = ["metric", *(result.variants[v] for v in variants), *ratio_headers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in result.metrics:
        lines.append("| " + " | ".join(_row(metric, variants, ratio_variants, result.baseline)) + " |")
    return lines


def _row(metric: Metric, variants: list[str], ratio_variants: list[str], baseline: str | None) -> list[str]:
    direction = "higher is better" if metric.higher_is_better else "lower is better"
    cells = [f"{metric.name} ({metric.unit}, {direction})"]
    cells += [format_number(metric.values[v]) if v in metric.values else "–" for v in variants]
    if baseline is not None:
        cells += [f"{metric.ratios[v]:.2f}" if v in metric.ratios else "–" for v in ratio_variants]
    return cells


def _target_line(result: BenchResult) -> str:
    target = result.target
    if target is None:
        return "**Target:** none set."
    if target.value is None:
        return f"**Target:** {target.text}: not measured."
    verdict = "met" if target.met else "**missed**"
    return f"**Target:** {target.text}: {verdict} ({target.value:.2f})."


def render_section(result: BenchResult, run: RunInfo) -> str:
    """Render one benchmark's section, markers included."""
    parameters = ", ".join(
        f"{key} = {value:,}" if isinstance(value, int) else f"{key} = {value}"
        for key, value in result.parameters.items()
    )
    load = ", ".join(f"{value:g}" for value in run.load_average)
    lines = [
        start_marker(result.name),
        f"## {result.name}: {result.title}",
        "",
        result.measured,
        "",
        f"- Command: `{run.command}`",
        f"- Run: {run.started_at}, {run.duration_s:.0f} s; {parameters}",
        f"- Machine: {summary_line(run.machine)}; load average at start {load} (1, 5, 15 min)",
    ]
    if run.quick:
        lines.append(
            "- Quick run: reduced sizes and rounds, so the figures only show that the benchmark works."
        )
    lines += ["", *_table(result), "", _target_line(result)]
    lines += [f"\n{note}" for note in result.notes]
    lines.append(end_marker(result.name))
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, sections: dict[str, str]) -> None:
    """Replace each named section of the file in place, or append it; create the file if missing."""
    text = path.read_text() if path.exists() else NEW_FILE_HEADER
    for name, section in sections.items():
        pattern = re.compile(
            re.escape(start_marker(name)) + r".*?" + re.escape(end_marker(name)) + r"\n?", re.DOTALL
        )
        match = pattern.search(text)
        if match:
            text = text[: match.start()] + section + text[match.end() :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
