"""Starting `python -m worker` and the raw aio-pika floor child the way the worker benchmarks need.

The worker gets the environment that the supervisor gives an instance: the
MRQ_* settings, a cluster key (so that its control listener starts too) and
the target module `bench.roles.worker_service`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import orjson

from bench.children import ChildProcess, child_env
from bench.context import BenchContext
from bench.observer import Arrival, ControlObserver
from sdk import names

NODE = "bench"
WORKER_TARGET = "bench.roles.worker_service"
READY_TIMEOUT_S = 60.0
LOG_LINE_TIMEOUT_S = 10.0
LOG_POLL_S = 0.02
_STARTUP_MS = re.compile(r"\bready startup_ms=(\d+)")


@dataclass(frozen=True)
class WorkerSetup:
    """Names shared by the runs of one worker benchmark."""

    exchange: str
    service: str
    prefetch: int = 32
    heartbeat_interval_s: float = 1.0

    @property
    def control_exchange(self) -> str:
        return names.control_exchange(self.exchange)


def worker_env(context: BenchContext, setup: WorkerSetup, instance: int, messages: int) -> dict[str, str]:
    return child_env(
        {
            "MRQ_BROKER_URL": context.broker_url,
            "MRQ_EXCHANGE": setup.exchange,
            "MRQ_NODE": NODE,
            "MRQ_SERVICE_NAME": setup.service,
            "MRQ_INSTANCE": str(instance),
            "MRQ_CLUSTER_KEY": os.urandom(32).hex(),
            "MRQ_HEARTBEAT_INTERVAL_S": repr(setup.heartbeat_interval_s),
            "MRQ_PREFETCH": str(setup.prefetch),
            "MRQ_CONCURRENCY": str(setup.prefetch),
            "MRQ_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            "BENCH_MESSAGES": str(messages),
        }
    )


@asynccontextmanager
async def start_worker(
    context: BenchContext, setup: WorkerSetup, instance: int, *, messages: int = 0
) -> AsyncIterator[ChildProcess]:
    argv = [context.python, "-m", "worker", "--target", WORKER_TARGET]
    env = worker_env(context, setup, instance, messages)
    label = f"worker-{setup.service}-{instance}"
    async with context.spawn(argv, label=label, env=env) as child:
        yield child


async def first_heartbeat(
    observer: ControlObserver, setup: WorkerSetup, instance: int, child: ChildProcess
) -> Arrival:
    """Wait for the first heartbeat of this worker process on the control exchange."""
    key = names.heartbeat_key(NODE, setup.service, instance)

    def is_ours(arrival: Arrival) -> bool:
        return arrival.routing_key == key and orjson.loads(arrival.body).get("pid") == child.pid

    return await observer.wait_for(is_ours, READY_TIMEOUT_S, f"heartbeat from pid {child.pid}")


async def startup_ms(child: ChildProcess) -> float:
    """Return the figure of the worker's own `ready startup_ms=N` log line."""
    with anyio.move_on_after(LOG_LINE_TIMEOUT_S):
        while True:
            match = _STARTUP_MS.search(child.stderr_text())
            if match:
                return float(match.group(1))
            await anyio.sleep(LOG_POLL_S)
    raise TimeoutError(
        f"worker pid {child.pid} logged no 'ready startup_ms=' line within {LOG_LINE_TIMEOUT_S:g} s; "
        f"its stderr ends with:\n{child.stderr_tail()}"
    )


@asynccontextmanager
async def start_raw_ready(
    context: BenchContext, setup: WorkerSetup, run: int, *, linger_s: float
) -> AsyncIterator[tuple[ChildProcess, str]]:
    """Start the raw floor child; yield it with the routing key of its "ready" message."""
    routing_key = f"ready.raw.{run}"
    params = {
        "broker_url": context.broker_url,
        "exchange": setup.control_exchange,
        "queue": f"raw-ready-{setup.service}",
        "routing_key": routing_key,
        "deadline_s": READY_TIMEOUT_S,
        "linger_s": linger_s,
    }
    argv = context.role_argv("raw_ready", json.dumps(params))
    label = f"raw-ready-{setup.service}-{run}"
    async with context.spawn(argv, label=label) as child:
        yield child, routing_key


async def raw_ready(observer: ControlObserver, routing_key: str, child: ChildProcess) -> Arrival:
    """Wait for the "ready" message of the raw floor child."""

    def is_ours(arrival: Arrival) -> bool:
        return arrival.routing_key == routing_key and orjson.loads(arrival.body).get("pid") == child.pid

    return await observer.wait_for(is_ours, READY_TIMEOUT_S, f"ready message from pid {child.pid}")
