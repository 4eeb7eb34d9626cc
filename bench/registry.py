"""The benchmarks that `scripts/bench` runs, by name, in the order a full run takes them.

To add a benchmark, write a module in `bench/` with an
`async def run(context: BenchContext) -> BenchResult` function and add its
name here.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable

from bench.context import BenchContext
from bench.results import BenchResult

Benchmark = Callable[[BenchContext], Awaitable[BenchResult]]

BENCHMARKS: dict[str, str] = {
    "sdk_throughput": "bench.sdk_throughput",
    "rpc": "bench.rpc",
    "worker_start": "bench.worker_start",
    "worker_idle": "bench.worker_idle",
    "worker_cpu": "bench.worker_cpu",
    "supervisors": "bench.supervisors",
}


class UnknownBenchmark(ValueError):
    """A benchmark name that the registry does not list."""


def load(name: str) -> Benchmark:
    """Import the module of benchmark `name` and return its `run` function."""
    module_name = BENCHMARKS.get(name)
    if module_name is None:
        raise UnknownBenchmark(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    module = importlib.import_module(module_name)
    run: Benchmark = module.run
    return run
