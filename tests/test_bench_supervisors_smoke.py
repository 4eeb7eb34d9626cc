"""The `supervisors` benchmark, run for real at the tiniest sizes on mrq alone (no peer is installed).

No test here asserts a timing: the figures depend on the machine and its load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# bench/ is a folder of scripts, not an installed package: import it from the repository.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.context import BenchContext  # noqa: E402
from bench.peers.fleets import MARKER_VARIABLE  # noqa: E402
from bench.peers.measures import Sizes  # noqa: E402
from bench.report import RunInfo, render_section  # noqa: E402
from bench.supervisors import PEERS_VARIABLE, UnknownPeer, measure, peers_from_env  # noqa: E402

TINY = Sizes(
    restart_instances=1,
    kills=1,
    kill_gap_s=1.1,
    hang_trials=1,
    peer_hang_wait_s=1.0,
    fleet=2,
    coldstart_rounds=1,
    settle_s=0.5,
    idle_window_s=1.0,
    profile_s=1.0,
)
MRQ_ONLY = {"mrq", "mrq_child"}
FLEET_MEASURES = {
    "coldstart_s",
    "first_ready_s",
    "first_log_s",
    "first_spawn_s",
    "ready_line_s",
    "idle_cpu_percent",
    "idle_rss_mib",
}


def _marked_pids() -> set[int]:
    """Return the pids of live processes that carry any run marker of the benchmark."""
    import psutil

    found = set()
    for process in psutil.process_iter(["status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER_VARIABLE}=".encode() in environ:
            found.add(process.pid)
    return found


def _measures(samples: list[dict[str, Any]], variant: str) -> set[str]:
    return {s["measure"] for s in samples if s["variant"] == variant}


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_mrq_only_run_reports_every_measure(broker_url: str, tmp_path: Path) -> None:
    before = _marked_pids()
    context = BenchContext(broker_url=broker_url, quick=True, log_dir=tmp_path)

    result = await measure(context, (), profile=False, sizes=TINY)

    assert set(result.variants) == MRQ_ONLY
    assert _measures(result.samples, "mrq") == {"restart_ms", "hang_detection_s", *FLEET_MEASURES}
    assert _measures(result.samples, "mrq_child") == {"restart_ms", "hang_never", *FLEET_MEASURES}
    restarts = [s for s in result.samples if s["measure"] == "restart_ms"]
    assert all(s["value"] > 0 and s["floor_ms"] > 0 and s["spawned_ms"] > 0 for s in restarts)
    assert (
        set(result.metric("restart, SIGKILL to the replacement's ready message, median").values) == MRQ_ONLY
    )
    assert set(result.metric("hang: loop blocked to `instance.unhealthy`, median").values) == {"mrq"}
    assert result.metric("supervisor RSS").values["mrq"] > 0
    assert result.target is not None
    assert result.target.value is None, "no PM2 ran, so the PM2 target is not measured"
    assert _marked_pids() <= before, "the benchmark left supervised processes running"


@pytest.mark.timeout(30)
def test_section_states_each_target() -> None:
    samples = [
        {"variant": "mrq", "measure": "restart_ms", "value": 300.0, "floor_ms": 290.0, "spawned_ms": 9.0},
        {
            "variant": "mrq_child",
            "measure": "restart_ms",
            "value": 230.0,
            "floor_ms": 190.0,
            "spawned_ms": 8.0,
        },
        {"variant": "mrq", "measure": "hang_detection_s", "value": 3.5, "reason": "no heartbeat"},
        {"variant": "mrq_child", "measure": "hang_never", "value": 1.0, "waited_s": 30.0},
        {"variant": "mrq", "measure": "idle_cpu_percent", "value": 0.5},
        {"variant": "mrq_child", "measure": "coldstart_s", "value": 2.0},
    ]
    from bench.peers.fleets import MrqLauncher
    from bench.peers.report import build_result

    launchers = [MrqLauncher(worker=True), MrqLauncher(worker=False)]
    result = build_result("supervisors", samples, TINY, launchers, None)
    run = RunInfo(
        command="python -m bench.supervisors",
        started_at="2026-01-01 00:00 UTC",
        duration_s=1.0,
        machine={
            "cpu_model": "test CPU",
            "cores": 2,
            "ram_gib": 4.0,
            "kernel": "Linux 6",
            "python": "CPython 3.11",
            "rabbitmq": "3.10.8",
            "aio_pika": "10.2.1",
            "uvloop": "0.23.0",
        },
        load_average=(0.5, 0.5, 0.5),
        quick=False,
    )

    section = render_section(result, run)

    assert (
        "| restart of mrq (worker) ≤ its floor + 25 ms | 300 ms against floor 290 ms (+10 ms) | met |"
        in section
    )
    assert "(+40 ms) | **missed** |" in section
    assert "| max 3.50 s | **missed** |" in section
    assert "| 0.50 % | met |" in section
    assert "fastest peer – – | not measured |" in section
    assert "mrq (same child) never replaced a child whose event loop was blocked, within 30 s" in section


@pytest.mark.timeout(30)
def test_peers_chosen_by_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEERS_VARIABLE, raising=False)
    assert peers_from_env() == ("pm2", "supervisord", "circus")
    monkeypatch.setenv(PEERS_VARIABLE, "")
    assert peers_from_env() == ()
    monkeypatch.setenv(PEERS_VARIABLE, "circus, pm2")
    assert peers_from_env() == ("circus", "pm2")
    monkeypatch.setenv(PEERS_VARIABLE, "pm2,runit")
    with pytest.raises(
        UnknownPeer, match="BENCH_PEERS names unknown peers runit; expected a comma-separated"
    ):
        peers_from_env()
