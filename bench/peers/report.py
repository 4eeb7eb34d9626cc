"""The result of the `supervisors` benchmark: its table, its four targets and the idle profile."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.peers.fleets import HEARTBEAT_INTERVAL_S, HEARTBEAT_MISSES, Launcher
from bench.peers.install import CIRCUS_REQUIREMENT, PM2_PACKAGE, SUPERVISOR_REQUIREMENT
from bench.peers.measures import Sizes
from bench.peers.profile import Profile
from bench.results import BenchResult, Metric, Target
from bench.stats import median, percentile

BASELINE = "mrq_child"
RESTART_MARGIN_MS = 25.0
HANG_MARGIN_S = 0.3
IDLE_CPU_LIMIT_PERCENT = 1.0
PROFILE_TOP = 10
VERSIONS = {
    "pm2": PM2_PACKAGE.split("@", 1)[1],
    "supervisord": SUPERVISOR_REQUIREMENT.split("==", 1)[1],
    "circus": CIRCUS_REQUIREMENT.split("==", 1)[1],
}
TITLES = {
    "mrq": "mrq (worker)",
    "mrq_child": "mrq (same child)",
    "pm2": f"PM2 {VERSIONS['pm2']}",
    "supervisord": f"supervisord {VERSIONS['supervisord']}",
    "circus": f"circus {VERSIONS['circus']}",
}
RESTART_MEDIAN = "restart, SIGKILL to the replacement's ready message, median"
HANG_MEDIAN = "hang: loop blocked to `instance.unhealthy`, median"


def values_of(samples: Sequence[dict[str, Any]], variant: str, measure: str) -> list[float]:
    return [float(s["value"]) for s in samples if s["variant"] == variant and s["measure"] == measure]


class Figures:
    """Medians and percentiles of the samples, by variant."""

    def __init__(self, samples: Sequence[dict[str, Any]], variants: Sequence[str]) -> None:
        self.samples = samples
        self.variants = list(variants)

    def quantile(self, variant: str, measure: str, fraction: float = 0.5) -> float | None:
        points = values_of(self.samples, variant, measure)
        return percentile(points, fraction) if points else None

    def extra(self, variant: str, measure: str, key: str) -> list[float]:
        """Return the field `key` of the variant's samples of `measure`, where present."""
        return [
            float(s[key])
            for s in self.samples
            if s["variant"] == variant and s["measure"] == measure and key in s
        ]

    def floor_ms(self, variant: str) -> float | None:
        points = self.extra(variant, "restart_ms", "floor_ms")
        return median(points) if points else None

    def per_variant(self, measure: str, fraction: float = 0.5) -> dict[str, float]:
        found = {v: self.quantile(v, measure, fraction) for v in self.variants}
        return {v: value for v, value in found.items() if value is not None}

    def restart_over_floor(self) -> dict[str, float]:
        """Return each variant's median of (restart - floor), both measured for the same kill."""
        result = {}
        for variant in self.variants:
            pairs = [
                float(s["value"]) - float(s["floor_ms"])
                for s in self.samples
                if s["variant"] == variant and s["measure"] == "restart_ms" and "floor_ms" in s
            ]
            if pairs:
                result[variant] = median(pairs)
        return result

    def spawned_ms(self) -> dict[str, float]:
        found = {v: self.extra(v, "restart_ms", "spawned_ms") for v in self.variants}
        return {v: median(points) for v, points in found.items() if points}


def metric(name: str, unit: str, values: dict[str, float]) -> Metric:
    # No ratios in the table: the harness reads those as paired per-round ratios, and these are not.
    return Metric(name=name, unit=unit, values=values)


def ratio_rows(metrics: Sequence[Metric], variants: Sequence[str]) -> list[str]:
    """Return a markdown table of each variant's value over the baseline's (mrq running the same child)."""
    others = [v for v in variants if v != BASELINE]
    header = ["metric", *(f"{TITLES[v]} / {TITLES[BASELINE]}" for v in others)]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in metrics:
        base = row.values.get(BASELINE)
        if not base or not any(v in row.values for v in others):
            continue
        cells = [f"{row.values[v] / base:.2f}" if v in row.values else "–" for v in others]
        rows.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return rows


def build_metrics(figures: Figures, sizes: Sizes) -> list[Metric]:
    floors = {v: f for v in figures.variants if (f := figures.floor_ms(v)) is not None}
    cpu = figures.per_variant("idle_cpu_percent")
    fleet = sizes.fleet
    rows = [
        ("child alone, exec to ready (floor), median", "ms", floors),
        (RESTART_MEDIAN, "ms", figures.per_variant("restart_ms")),
        ("restart, p95", "ms", figures.per_variant("restart_ms", 0.95)),
        ("restart minus its floor, median", "ms", figures.restart_over_floor()),
        ("SIGKILL to `instance started` log line, median", "ms", figures.spawned_ms()),
        (HANG_MEDIAN, "s", figures.per_variant("hang_detection_s")),
        ("hang, max", "s", figures.per_variant("hang_detection_s", 1.0)),
        (f"cold start of {fleet} to all ready, median", "s", figures.per_variant("coldstart_s")),
        ("cold start to the first child ready, median", "s", figures.per_variant("first_ready_s")),
        ("cold start to the first log line (imports done), median", "s", figures.per_variant("first_log_s")),
        ("cold start to the first `instance started`, median", "s", figures.per_variant("first_spawn_s")),
        ("cold start to the `supervisor ready` log line, median", "s", figures.per_variant("ready_line_s")),
        (f"supervisor CPU with {fleet} idle children", "% of one core", cpu),
        ("supervisor CPU", "s per minute", {v: x * 0.6 for v, x in cpu.items()}),
        ("supervisor RSS", "MiB", figures.per_variant("idle_rss_mib")),
    ]
    return [metric(name, unit, values) for name, unit, values in rows]


def _verdict(met: bool | None) -> str:
    if met is None:
        return "not measured"
    return "met" if met else "**missed**"


def _fmt(value: float | None, unit: str, digits: int = 0, sign: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{sign},.{digits}f} {unit}"


def _restart_rows(figures: Figures) -> list[str]:
    over = figures.restart_over_floor()
    restart = figures.per_variant("restart_ms")
    rows = []
    for variant in ("mrq", "mrq_child"):
        value = over.get(variant)
        met = None if value is None else value <= RESTART_MARGIN_MS
        rows.append(
            f"| restart of {TITLES[variant]} ≤ its floor + {RESTART_MARGIN_MS:g} ms "
            f"| {_fmt(restart.get(variant), 'ms')} against floor {_fmt(figures.floor_ms(variant), 'ms')} "
            f"({_fmt(value, 'ms', sign='+')}) | {_verdict(met)} |"
        )
    pm2, mine = restart.get("pm2"), restart.get("mrq_child")
    met = None if pm2 is None or mine is None else mine < pm2
    rows.append(
        f"| restart of the same child below PM2's | mrq {_fmt(mine, 'ms')}, PM2 {_fmt(pm2, 'ms')}; "
        f"minus the floor: mrq {_fmt(over.get('mrq_child'), 'ms', sign='+')}, "
        f"PM2 {_fmt(over.get('pm2'), 'ms', sign='+')} | {_verdict(met)} |"
    )
    return rows


def _hang_row(figures: Figures) -> str:
    worst = figures.quantile("mrq", "hang_detection_s", 1.0)
    limit = HEARTBEAT_INTERVAL_S * HEARTBEAT_MISSES + HANG_MARGIN_S
    met = None if worst is None else worst <= limit
    return (
        f"| hang detected within {HEARTBEAT_INTERVAL_S:g} s × {HEARTBEAT_MISSES} misses + "
        f"{HANG_MARGIN_S:g} s = {limit:g} s, every trial | max {_fmt(worst, 's', 2)} | {_verdict(met)} |"
    )


def _cpu_row(figures: Figures, sizes: Sizes) -> str:
    cpu = figures.quantile("mrq", "idle_cpu_percent")
    met = None if cpu is None else cpu <= IDLE_CPU_LIMIT_PERCENT
    return (
        f"| supervisor CPU with {sizes.fleet} idle workers at {HEARTBEAT_INTERVAL_S:g} s heartbeats "
        f"≤ {IDLE_CPU_LIMIT_PERCENT:g} % of one core | {_fmt(cpu, '%', 2)} | {_verdict(met)} |"
    )


def _coldstart_row(figures: Figures, sizes: Sizes) -> str:
    cold = figures.per_variant("coldstart_s")
    peers = {v: x for v, x in cold.items() if v in VERSIONS}
    fastest = min(peers, key=lambda v: peers[v]) if peers else None
    best = peers[fastest] if fastest else None
    mine = cold.get("mrq_child")
    met = None if mine is None or best is None else mine <= best
    return (
        f"| cold start of {sizes.fleet} same children no slower than the fastest peer "
        f"| mrq {_fmt(mine, 's', 2)}, fastest peer {fastest or '–'} {_fmt(best, 's', 2)} | {_verdict(met)} |"
    )


def target_rows(figures: Figures, sizes: Sizes) -> list[str]:
    """Return the markdown table of the four targets, each with its figure and verdict."""
    header = ["| target | figure | verdict |", "|---|---|---|"]
    return [
        *header,
        *_restart_rows(figures),
        _hang_row(figures),
        _cpu_row(figures, sizes),
        _coldstart_row(figures, sizes),
    ]


def hang_note(samples: Sequence[dict[str, Any]]) -> str:
    never = sorted({TITLES[s["variant"]] for s in samples if s["measure"] == "hang_never"})
    replaced = [s for s in samples if s["measure"] == "hang_replaced_s"]
    reasons = sorted({str(s.get("reason")) for s in samples if s["measure"] == "hang_detection_s"})
    waited = next((s["waited_s"] for s in samples if "waited_s" in s), None)
    parts = []
    if never:
        parts.append(
            f"Hang: {', '.join(never)} never replaced a child whose event loop was blocked, within "
            f"{waited:g} s of watching (shown as – in the hang rows): none of them checks liveness, and the "
            "child runs no heartbeat."
        )
    for s in replaced:
        parts.append(f"{TITLES[s['variant']]} replaced its hung child after {s['value']:.2f} s.")
    if reasons:
        parts.append(f"mrq's reason in the event: {'; '.join(reasons)}.")
    return " ".join(parts)


def profile_note(profile: Profile | None) -> str | None:
    if profile is None:
        return None
    if not profile.samples:
        return f"Profile of the idle mrq-supervisor: no running sample in {profile.duration_s:g} s."
    lines = [
        f"Where the idle mrq-supervisor (worker fleet) spends its CPU: `py-spy record --nonblocking` at "
        f"{profile.rate_hz} Hz for {profile.duration_s:g} s, right after the CPU window; {profile.samples} "
        f"samples with a thread running, about {profile.cpu_s:.2f} CPU s. Share of those samples:",
        "",
        "Stacks are cut below the event loop and below anyio's worker threads; "
        '"on the stack" counts a function with everything it called.',
        "",
        "| function (self) | share | function (on the stack) | share |",
        "|---|---|---|---|",
    ]
    own = profile.top(profile.self_samples, PROFILE_TOP)
    total = profile.top(profile.total_samples, PROFILE_TOP)
    for index in range(max(len(own), len(total))):
        left = f"`{own[index][0]}` | {own[index][2]:.0%}" if index < len(own) else " | "
        right = f"`{total[index][0]}` | {total[index][2]:.0%}" if index < len(total) else " | "
        lines.append(f"| {left} | {right} |")
    return "\n".join(lines)


def setup_note(sizes: Sizes, launchers: Sequence[Launcher]) -> str:
    present = ", ".join(TITLES[x.key] for x in launchers)
    return (
        f"Variants: {present}. The peers run with their default restart settings: PM2 in fork mode, "
        "`instances` N, `--no-daemon` (its God daemon runs in the process that is measured); supervisord "
        "in the foreground, one program with `numprocs` N; circusd with one watcher of `numprocesses` N "
        f"and Unix-socket endpoints. mrq-supervisor: heartbeat_interval_s {HEARTBEAT_INTERVAL_S:g}, "
        f"heartbeat_misses {HEARTBEAT_MISSES}, "
        "stable_after_s 1, so the first restart after a run of 1 s is immediate, as the peers' are. "
        f"Restarts: {sizes.restart_instances} children per variant, every fleet running at once, "
        f"{sizes.kills} kills per variant taken in rotating order over the variants, each right after a "
        f"floor start of the same child and followed by a {sizes.kill_gap_s:g} s pause. Hang: "
        f"{sizes.hang_trials} trials, trial k blocking the loop k/{sizes.hang_trials} of a heartbeat "
        "interval after a heartbeat arrived (trial 0 is the slowest case). "
        f"{sizes.coldstart_rounds} cold-start rounds of {sizes.fleet} in rotating order; CPU over "
        f"{sizes.idle_window_s:g} s "
        f"after {sizes.settle_s:g} s of settling. Supervisor CPU is user plus system time of the "
        "supervisor's own process (threads included, children not), read with psutil."
    )


def build_result(
    name: str,
    samples: list[dict[str, Any]],
    sizes: Sizes,
    launchers: Sequence[Launcher],
    profile: Profile | None,
) -> BenchResult:
    variants = [x.key for x in launchers]
    figures = Figures(samples, variants)
    metrics = build_metrics(figures, sizes)
    notes = [
        "**Targets**\n\n" + "\n".join(target_rows(figures, sizes)),
        "**Ratios** of medians to mrq running the same child (above 1: mrq is lower)\n\n"
        + "\n".join(ratio_rows(metrics, variants)),
        hang_note(samples),
    ]
    notes += [note for note in (profile_note(profile), setup_note(sizes, launchers)) if note]
    result = BenchResult(
        name=name,
        title="mrq-supervisor against PM2, supervisord and circus",
        measured=(
            "Every supervisor runs the same child: a small aio-pika program that connects, declares a queue "
            'and publishes a "ready" message with its pid to the control exchange; mrq also runs its own '
            "worker, whose first heartbeat is its ready message. Times run from just before the event (the "
            "supervisor's exec, the SIGKILL, the blocked loop) to the arrival of the message on a consumer "
            "of the control exchange. The floor is the child started bare by the benchmark, exec to ready."
        ),
        variants={key: TITLES[key] for key in variants},
        baseline=None,
        parameters={"fleet": sizes.fleet, "kills": sizes.kills, "rounds": sizes.coldstart_rounds},
        metrics=metrics,
        target=Target(
            text="PM2's median restart over mrq's on the same child ≥ 1 (mrq restarts no slower than PM2)",
            metric=RESTART_MEDIAN,
            variant="pm2",
            limit=1.0,
            at_least=True,
        ),
        notes=[note for note in notes if note],
        samples=samples,
    )
    restart = result.metric(RESTART_MEDIAN).values
    if result.target is not None and "pm2" in restart and restart.get(BASELINE):
        result.target.value = restart["pm2"] / restart[BASELINE]
    return result
