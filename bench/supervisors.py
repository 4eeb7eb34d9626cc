"""supervisors: mrq-supervisor against PM2, supervisord and circus, on the same child, in one run.

The child of every supervisor is `bench/peers/child.py`, a small aio-pika
program that connects, declares a queue and publishes a "ready" message with
its pid to the control exchange. mrq runs it as a `command` program
(variant `mrq_child`) and also runs the mrq worker (variant `mrq`), whose
first heartbeat is its ready message. The run measures, in this order:

1. restart latency, from the SIGKILL of one child of a few to the
   replacement's ready message. All fleets run at once, and the kills rotate
   over the variants. Right before each kill comes the floor: the same child
   started bare by the benchmark, timed from exec to ready;
2. hang detection, from a message that blocks the worker's event loop to
   the supervisor's `instance.unhealthy` event, at 1 s heartbeats and 3
   misses. The other variants get a child that blocks its loop, and the run
   watches whether they replace it;
3. cold start of a fleet of 50 to all ready, and on the last round the
   supervisor's own CPU time and memory over 60 s of idling, with a py-spy
   profile of mrq-supervisor afterwards.

The peers are installed into bench/.peers/ on first use. BENCH_PEERS
chooses them: a comma-separated subset of pm2, supervisord and circus, or
empty for mrq alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from bench.context import BenchContext, unique_suffix
from bench.peers.fleets import CircusLauncher, Launcher, MrqLauncher, Pm2Launcher, SupervisordLauncher
from bench.peers.install import PeerTools, ensure_peers
from bench.peers.measures import Bench, Sizes
from bench.peers.report import build_result
from bench.peers.watch import ControlWatch
from bench.results import BenchResult
from sdk import names

NAME = "supervisors"
PEERS_VARIABLE = "BENCH_PEERS"
ALL_PEERS = ("pm2", "supervisord", "circus")


class UnknownPeer(ValueError):
    """BENCH_PEERS names a supervisor that the benchmark does not know."""


def peers_from_env() -> tuple[str, ...]:
    """Return the peers that BENCH_PEERS chooses (all of them when it is unset)."""
    raw = os.environ.get(PEERS_VARIABLE)
    if raw is None:
        return ALL_PEERS
    chosen = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = [name for name in chosen if name not in ALL_PEERS]
    if unknown:
        raise UnknownPeer(
            f"{PEERS_VARIABLE} names unknown peers {', '.join(unknown)}; "
            f"expected a comma-separated subset of {', '.join(ALL_PEERS)}, or empty for mrq alone"
        )
    return chosen


async def run(context: BenchContext) -> BenchResult:
    """Measure mrq-supervisor and the peers that BENCH_PEERS chooses; profile the idle supervisor."""
    return await measure(context, peers_from_env(), profile=True)


def launchers_for(peers: Sequence[str], tools: PeerTools | None) -> list[Launcher]:
    launchers: list[Launcher] = [MrqLauncher(worker=True), MrqLauncher(worker=False)]
    if tools is None:
        return launchers
    factories: dict[str, Callable[[PeerTools], Launcher]] = {
        "pm2": Pm2Launcher,
        "supervisord": SupervisordLauncher,
        "circus": CircusLauncher,
    }
    return launchers + [factories[name](tools) for name in peers]


async def measure(
    context: BenchContext, peers: Sequence[str], *, profile: bool, sizes: Sizes | None = None
) -> BenchResult:
    """Run every measure on mrq and on `peers`; profile the idle mrq-supervisor with py-spy when `profile`.

    `sizes` replaces the sizes that the context implies (full or `--quick`).
    """
    tools = await ensure_peers() if peers or profile else None
    launchers = launchers_for(peers, tools)
    sizes = sizes or Sizes.of(context)
    marker = unique_suffix()
    exchange = f"benchsup{marker}"
    folder = Path(tempfile.mkdtemp(prefix="mrq-bench-supervisors-"))
    failed = True
    try:
        async with ControlWatch(context.broker_url, names.control_exchange(exchange)) as watch:
            bench = Bench(context, sizes, watch, exchange, marker, folder)
            bench.py_spy = tools.py_spy if profile and tools is not None else None
            samples = await _measure_all(bench, launchers)
        failed = False
    finally:
        _keep_or_remove(folder, context.log_dir, failed)
    return build_result(NAME, samples, sizes, launchers, bench.profile)


async def _measure_all(bench: Bench, launchers: list[Launcher]) -> list[dict[str, Any]]:
    samples = await bench.restarts(launchers)
    samples += await bench.hang_mrq()
    samples += await bench.hang_others([x for x in launchers if x.key != "mrq"])
    samples += await bench.fleets(launchers)
    return samples


def _keep_or_remove(folder: Path, log_dir: Path, failed: bool) -> None:
    """Keep the fleets' configurations and logs in the log folder after a failure; delete them otherwise."""
    if failed:
        target = log_dir / folder.name
        shutil.move(folder, target)
        logger.warning("supervisors benchmark failed; fleet files kept folder={}", target)
        return
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """Run this benchmark through the harness: `python -m bench.supervisors [--quick] [--json FILE] ...`.

    The harness runs only the benchmarks that `bench.registry` lists; this
    adds this one for the run, so that it works before it is listed there.
    """
    from bench import __main__ as harness
    from bench.registry import BENCHMARKS

    BENCHMARKS.setdefault(NAME, "bench.supervisors")
    return harness.main([NAME, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
