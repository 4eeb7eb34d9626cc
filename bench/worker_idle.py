"""worker_idle: resident memory of an idle worker, against the raw aio-pika child and a bare interpreter.

Each round starts the three side by side, waits until each is ready (the
worker's first heartbeat, the raw child's "ready" message), and reads each
one's RSS IDLE_AFTER_S seconds after its spawn.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import psutil
from loguru import logger

from bench.children import ChildProcess
from bench.context import BenchContext, unique_suffix
from bench.observer import ControlObserver
from bench.results import BenchResult, summarize
from bench.workers import WorkerSetup, first_heartbeat, raw_ready, start_raw_ready, start_worker

NAME = "worker_idle"
VARIANTS = {"worker": "python -m worker", "raw": "raw aio-pika child", "python": "idle python"}
IDLE_AFTER_S = 5.0
LINGER_S = 120.0
MIB = 1024 * 1024


async def _rss_mib_at(child: ChildProcess, at_s: float) -> float:
    """Return the child's resident set size at monotonic time `at_s` (or now, if that is past)."""
    await anyio.sleep(max(0.0, at_s - time.monotonic()))
    process = psutil.Process(child.pid)
    info = await anyio.to_thread.run_sync(process.memory_info)
    return float(info.rss) / MIB


async def _round(
    context: BenchContext, setup: WorkerSetup, observer: ControlObserver, index: int
) -> dict[str, float]:
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(start_worker(context, setup, index))
        raw, routing_key = await stack.enter_async_context(
            start_raw_ready(context, setup, index, linger_s=LINGER_S)
        )
        sleeper_argv = [context.python, "-c", f"import time; time.sleep({LINGER_S})"]
        sleeper = await stack.enter_async_context(context.spawn(sleeper_argv, label=f"python-idle-{index}"))
        await first_heartbeat(observer, setup, index, worker)
        await raw_ready(observer, routing_key, raw)
        return {
            "worker": await _rss_mib_at(worker, worker.started_s + IDLE_AFTER_S),
            "raw": await _rss_mib_at(raw, raw.started_s + IDLE_AFTER_S),
            "python": await _rss_mib_at(sleeper, sleeper.started_s + IDLE_AFTER_S),
        }


async def run(context: BenchContext) -> BenchResult:
    """Start the three side by side once per round and read their memory."""
    rounds = context.rounds(5, 1)
    suffix = unique_suffix()
    setup = WorkerSetup(exchange=f"bench{suffix}", service=f"idle{suffix}")
    samples: list[dict[str, Any]] = []
    async with ControlObserver(context.broker_url, setup.control_exchange) as observer:
        for index in range(rounds):
            rss = await _round(context, setup, observer, index)
            for variant, value in rss.items():
                samples.append({"round": index + 1, "variant": variant, "rss_mib": value})
            logger.info(
                "round done benchmark={} round={} worker_rss_mib={:.1f} raw_rss_mib={:.1f} "
                "python_rss_mib={:.1f}",
                NAME,
                index + 1,
                rss["worker"],
                rss["raw"],
                rss["python"],
            )
    return BenchResult(
        name=NAME,
        title="idle worker memory",
        measured=(
            f"Resident set size (RSS) {IDLE_AFTER_S:g} s after spawn, read with psutil, of an idle "
            "`python -m worker` serving one route (control listener and heartbeats running), of the raw "
            'aio-pika child of worker_start idling after its "ready" message, and of '
            "`python -c 'import time; time.sleep(...)'`. The three run side by side in each round."
        ),
        variants=VARIANTS,
        baseline="raw",
        parameters={"rounds": rounds, "idle_after_s": IDLE_AFTER_S},
        metrics=[
            summarize(samples, "rss_mib", name="RSS", unit="MiB", variants=list(VARIANTS), baseline="raw")
        ],
        notes=["The ratio to the raw child is the memory that mrq adds on top of aio-pika and uvloop."],
        samples=samples,
    )
