"""worker_start: time from exec to the first heartbeat of `python -m worker`, against two floors.

Each run measures three variants in rotating order. The worker counts from
just before its process is spawned to the arrival of its first heartbeat
on a consumer of the control exchange, and its own `ready startup_ms` log
figure is recorded too. The floor is a minimal raw aio-pika child that
connects, declares a queue and publishes one "ready" message, timed to
that message's arrival. A bare interpreter (`python -c pass`) is timed to
its exit.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from bench.context import BenchContext, unique_suffix, variant_order
from bench.observer import ControlObserver
from bench.results import BenchResult, summarize
from bench.workers import WorkerSetup, first_heartbeat, raw_ready, start_raw_ready, start_worker, startup_ms

NAME = "worker_start"
VARIANTS = {"worker": "python -m worker", "raw": "raw aio-pika child", "python": "python -c pass"}
EXIT_TIMEOUT_S = 30.0
RAW_LINGER_S = 60.0

Measure = Callable[[BenchContext, WorkerSetup, ControlObserver, int], Awaitable[dict[str, float]]]


async def _measure_worker(
    context: BenchContext, setup: WorkerSetup, observer: ControlObserver, run: int
) -> dict[str, float]:
    async with start_worker(context, setup, run) as child:
        arrival = await first_heartbeat(observer, setup, run, child)
        own_ms = await startup_ms(child)
    return {"ready_ms": (arrival.arrived_s - child.started_s) * 1000, "own_startup_ms": own_ms}


async def _measure_raw(
    context: BenchContext, setup: WorkerSetup, observer: ControlObserver, run: int
) -> dict[str, float]:
    async with start_raw_ready(context, setup, run, linger_s=RAW_LINGER_S) as (child, routing_key):
        arrival = await raw_ready(observer, routing_key, child)
    return {"ready_ms": (arrival.arrived_s - child.started_s) * 1000}


async def _measure_python(
    context: BenchContext, setup: WorkerSetup, observer: ControlObserver, run: int
) -> dict[str, float]:
    argv = [context.python, "-c", "pass"]
    async with context.spawn(argv, label=f"python-pass-{run}") as child:
        await child.wait_exit(EXIT_TIMEOUT_S)
        exited_s = time.monotonic()
    return {"ready_ms": (exited_s - child.started_s) * 1000}


MEASURES: dict[str, Measure] = {"worker": _measure_worker, "raw": _measure_raw, "python": _measure_python}


async def run(context: BenchContext) -> BenchResult:
    """Start each variant once per run, in rotating order, for the configured number of runs."""
    runs = context.rounds(20, 3)
    suffix = unique_suffix()
    setup = WorkerSetup(exchange=f"bench{suffix}", service=f"start{suffix}")
    samples: list[dict[str, Any]] = []
    async with ControlObserver(context.broker_url, setup.control_exchange) as observer:
        for index in range(runs):
            for variant in variant_order(index, list(VARIANTS)):
                sample = await MEASURES[variant](context, setup, observer, index)
                samples.append({"round": index + 1, "variant": variant, **sample})
                logger.info(
                    "run done benchmark={} run={} variant={} ready_ms={:.1f}",
                    NAME,
                    index + 1,
                    variant,
                    sample["ready_ms"],
                )
    return _result(samples, runs)


def _result(samples: list[dict[str, Any]], runs: int) -> BenchResult:
    variants = list(VARIANTS)
    metrics = [
        summarize(
            samples, "ready_ms", name="exec to ready, median", unit="ms", variants=variants, baseline="raw"
        ),
        summarize(
            samples,
            "ready_ms",
            name="exec to ready, p95",
            unit="ms",
            variants=variants,
            baseline="raw",
            quantile=0.95,
        ),
        summarize(
            samples,
            "own_startup_ms",
            name="worker's own `ready startup_ms`, median",
            unit="ms",
            variants=variants,
            baseline=None,
        ),
    ]
    return BenchResult(
        name=NAME,
        title="worker start-up, exec to first heartbeat",
        measured=(
            "Time from just before the process is spawned to the moment it is ready. Worker: "
            "`python -m worker` serving one route (settings as the supervisor passes them, cluster key "
            "included, so the control listener starts too) until its first heartbeat arrives on a "
            "consumer of the control exchange; the worker's own `ready startup_ms` log figure counts "
            "from its process start to the first heartbeat sent. Raw: a child that imports aio-pika and "
            "uvloop, connects, declares a durable queue and publishes one message, until that message "
            "arrives. Python: `python -c pass` until it exits. The worker's and the raw child's "
            "figures include their own connection set-up."
        ),
        variants=VARIANTS,
        baseline="raw",
        parameters={"runs": runs},
        metrics=metrics,
        notes=[
            "The ratio to the raw child is the start-up time that mrq adds on top of aio-pika and uvloop."
        ],
        samples=samples,
    )
