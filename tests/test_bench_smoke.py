"""The benchmark harness: a quick real run of two benchmarks, its arguments, and its report.

No test here asserts a timing: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# bench/ is a folder of scripts, not an installed package: import it from the repository.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import RunInfo, end_marker, render_section, start_marker, update_markdown  # noqa: E402
from bench.results import BenchResult, Target, summarize  # noqa: E402
from bench.stats import paired_ratio, percentile  # noqa: E402

MACHINE = {
    "cpu_model": "test CPU",
    "cores": 2,
    "ram_gib": 4.0,
    "kernel": "Linux 6",
    "python": "CPython 3.11",
    "rabbitmq": "3.10.8",
    "aio_pika": "10.2.1",
    "uvloop": "0.23.0",
}
SMOKE_METRICS = {
    "sdk_throughput": {"throughput", "producer CPU", "consumer CPU"},
    "rpc": {
        "sequential latency p50",
        "sequential latency p99",
        "throughput, 64 in flight",
        "client CPU, sequential",
        "server CPU",
    },
}


def _result(name: str, mrq: list[float], raw: list[float]) -> BenchResult:
    samples = [{"round": i + 1, "variant": "mrq", "rate": v} for i, v in enumerate(mrq)]
    samples += [{"round": i + 1, "variant": "raw", "rate": v} for i, v in enumerate(raw)]
    metric = summarize(
        samples,
        "rate",
        name="throughput",
        unit="msg/s",
        variants=["mrq", "raw"],
        baseline="raw",
        higher_is_better=True,
    )
    result = BenchResult(
        name=name,
        title="a test benchmark",
        measured="Nothing real.",
        variants={"mrq": "mrq", "raw": "raw aio-pika"},
        baseline="raw",
        parameters={"rounds": len(mrq)},
        metrics=[metric],
        target=Target(text="mrq/raw ≥ 0.9", metric="throughput", variant="mrq", limit=0.9, at_least=True),
        samples=samples,
    )
    result.evaluate_target()
    return result


def _run_info() -> RunInfo:
    return RunInfo(
        command="scripts/bench test",
        started_at="2026-01-01 00:00 UTC",
        duration_s=1.0,
        machine=MACHINE,
        load_average=(0.5, 0.5, 0.5),
        quick=False,
    )


@pytest.mark.timeout(600)
def test_quick_run_reports_every_field(tmp_path: Path) -> None:
    json_path = tmp_path / "results.json"
    markdown_path = tmp_path / "BENCHMARKS.md"
    command = [
        str(REPO / "scripts" / "bench"),
        "--quick",
        "sdk_throughput",
        "rpc",
        "--json",
        str(json_path),
        "--markdown",
        str(markdown_path),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=540, check=False)
    assert finished.returncode == 0, finished.stderr[-4000:]

    document = json.loads(json_path.read_text())
    assert document["failed"] == []
    results = {result["name"]: result for result in document["results"]}
    assert set(results) == set(SMOKE_METRICS)
    for name, expected_metrics in SMOKE_METRICS.items():
        result = results[name]
        metrics = {metric["name"]: metric for metric in result["metrics"]}
        assert set(metrics) == expected_metrics, name
        for metric in metrics.values():
            assert set(metric["values"]) == {"mrq", "raw"}, (name, metric["name"])
            assert all(value > 0 for value in metric["values"].values()), (name, metric)
            assert metric["ratios"]["mrq"] > 0, (name, metric["name"])
        assert result["target"]["value"] > 0, name
        assert isinstance(result["target"]["met"], bool), name
        assert {sample["variant"] for sample in result["samples"]} == {"mrq", "raw"}, name
        assert result["run"]["quick"] is True, name
        assert result["run"]["machine"]["rabbitmq"], name

    markdown = markdown_path.read_text()
    for name in SMOKE_METRICS:
        assert start_marker(name) in markdown
        assert end_marker(name) in markdown
        assert f"## {name}:" in finished.stdout
    assert "| metric | mrq | raw aio-pika | mrq/raw |" in markdown
    assert "**Target:**" in markdown


@pytest.mark.timeout(60)
def test_unknown_benchmark_rejected() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "no_such_benchmark"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert finished.returncode == 2
    assert "unknown benchmark no_such_benchmark" in finished.stderr
    assert "sdk_throughput" in finished.stderr


@pytest.mark.timeout(30)
def test_markdown_update_keeps_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    foreign = f"{start_marker('supervisor_restart')}\nrestart figures\n{end_marker('supervisor_restart')}\n"
    path.write_text(f"# Benchmarks\n\nHand-written method notes.\n\n{foreign}")
    first = render_section(_result("sdk_throughput", [900, 1000], [1000, 1000]), _run_info())
    second = render_section(_result("sdk_throughput", [1100, 1200], [1000, 1000]), _run_info())

    update_markdown(path, {"sdk_throughput": first})
    update_markdown(path, {"sdk_throughput": second})

    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written method notes.\n")
    assert foreign in text
    assert text.count(start_marker("sdk_throughput")) == 1
    assert second in text
    assert first not in text


@pytest.mark.timeout(30)
def test_section_states_missed_target() -> None:
    section = render_section(_result("sdk_throughput", [800, 850, 700], [1000, 1000, 1000]), _run_info())
    assert "**Target:** mrq/raw ≥ 0.9: **missed** (0.80)." in section
    assert "| throughput (msg/s, higher is better) | 800 | 1,000 | 0.80 |" in section
    assert "Command: `scripts/bench test`" in section
    assert "test CPU, 2 cores, 4.0 GiB RAM" in section


@pytest.mark.timeout(30)
def test_paired_ratio_uses_rounds() -> None:
    # Per-round ratios 0.5, 0.9 and 0.3 have the median 0.5; the ratio of the medians would be 0.9.
    assert paired_ratio([50.0, 90.0, 300.0], [100.0, 100.0, 1000.0]) == 0.5
    with pytest.raises(ValueError, match="paired samples differ in length: 2 against 3"):
        paired_ratio([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.timeout(30)
def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError, match=r"expected a fraction from 0 to 1, got 1\.5"):
        percentile(values, 1.5)
