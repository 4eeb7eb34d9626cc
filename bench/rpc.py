"""rpc: request-reply latency and throughput, mrq against raw aio-pika.

A server process replies to each call with the body it received. A client
process first makes warm-up calls, then times sequential calls one by one
(p50 and p99), then keeps WINDOW calls in flight (calls per second). Both sides use
the same design. Requests are published with a confirm and `mandatory=True`
to a durable queue with prefetch PREFETCH. Replies come over direct reply-to
to one long-lived reply consumer that resolves a future per correlation id,
and the server acks after replying. mrq: `Client.call` against a
`ServiceHost` route.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loguru import logger

from bench.context import BenchContext, unique_suffix, variant_order
from bench.results import BenchResult, Target, summarize
from bench.stats import percentile

NAME = "rpc"
VARIANTS = {"mrq": "mrq", "raw": "raw aio-pika"}
WINDOW = 64
PREFETCH = 64
TARGET_RATIO = 1.1
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
# The slowest rate at which a round still counts as running rather than stuck.
MIN_RATE_PER_S = 50.0


@dataclass(frozen=True)
class _Setup:
    warmup: int
    calls: int
    concurrent_calls: int
    exchange: str
    service: str
    route: str
    raw_queue: str
    deadline_s: float


async def run(context: BenchContext) -> BenchResult:
    """Measure both variants in alternating order for the configured rounds."""
    suffix = unique_suffix()
    warmup = context.size(200, 50)
    calls = context.size(2_000, 200)
    concurrent_calls = context.size(5_000, 500)
    setup = _Setup(
        warmup=warmup,
        calls=calls,
        concurrent_calls=concurrent_calls,
        exchange=f"bench{suffix}",
        service=f"rpc{suffix}",
        route="echo",
        raw_queue=f"rawrpc{suffix}",
        deadline_s=(warmup + calls + concurrent_calls) / MIN_RATE_PER_S + READY_TIMEOUT_S,
    )
    rounds = context.rounds(7, 1)
    samples: list[dict[str, Any]] = []
    for index in range(rounds):
        for variant in variant_order(index, list(VARIANTS)):
            sample = await _measure(context, setup, variant)
            samples.append({"round": index + 1, "variant": variant, **sample})
            logger.info(
                "round done benchmark={} round={} variant={} p50_ms={:.3f} p99_ms={:.3f} calls_per_s={:.0f}",
                NAME,
                index + 1,
                variant,
                sample["p50_ms"],
                sample["p99_ms"],
                sample["calls_per_s"],
            )
    return _result(samples, setup, rounds)


def _params(context: BenchContext, setup: _Setup, variant: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Return the role module, the server's parameters and the client's."""
    common = {
        "broker_url": context.broker_url,
        "exchange": setup.exchange,
        "prefetch": PREFETCH,
        "window": WINDOW,
        "deadline_s": setup.deadline_s,
        "call_timeout_s": CALL_TIMEOUT_S,
        "warmup": setup.warmup,
        "calls": setup.calls,
        "concurrent_calls": setup.concurrent_calls,
    }
    if variant == "mrq":
        server = {**common, "service": setup.service, "route": setup.route}
        return "mrq_side", server, {**common, "target": f"{setup.service}.{setup.route}"}
    return "raw_side", {**common, "queue": setup.raw_queue}, {**common, "target": setup.raw_queue}


async def _measure(context: BenchContext, setup: _Setup, variant: str) -> dict[str, float]:
    module, server_params, client_params = _params(context, setup, variant)
    server_argv = context.role_argv(module, "rpc-server", json.dumps(server_params))
    client_argv = context.role_argv(module, "rpc-client", json.dumps(client_params))
    async with context.spawn(server_argv, label=f"{NAME}-{variant}-server") as server:
        await server.expect("ready", READY_TIMEOUT_S)
        async with context.spawn(client_argv, label=f"{NAME}-{variant}-client") as client:
            called = await client.expect("result", setup.deadline_s)
            await client.expect_exit(EXIT_TIMEOUT_S)
        server.terminate()
        served = await server.expect("result", EXIT_TIMEOUT_S)
        await server.expect_exit(EXIT_TIMEOUT_S)
    latencies_ms = [value * 1000 for value in called["latencies_s"]]
    total_calls = setup.warmup + setup.calls + setup.concurrent_calls
    return {
        "p50_ms": percentile(latencies_ms, 0.5),
        "p99_ms": percentile(latencies_ms, 0.99),
        "calls_per_s": setup.concurrent_calls / called["concurrent_s"],
        "client_cpu_us": called["sequential_cpu_s"] / setup.calls * 1e6,
        "server_cpu_us": served["cpu_s"] / total_calls * 1e6,
    }


def _result(samples: list[dict[str, Any]], setup: _Setup, rounds: int) -> BenchResult:
    variants = list(VARIANTS)

    def metric(key: str, name: str, unit: str, higher_is_better: bool = False) -> Any:
        return summarize(
            samples,
            key,
            name=name,
            unit=unit,
            variants=variants,
            baseline="raw",
            higher_is_better=higher_is_better,
        )

    result = BenchResult(
        name=NAME,
        title="RPC latency and throughput, server and client in two processes",
        measured=(
            "A client process calls a server process that returns the ~200-byte JSON body it got. "
            f"Sequential: {setup.calls:,} calls one at a time after {setup.warmup:,} warm-up calls, "
            f"latency per call (p50, p99 within each round). Concurrent: {setup.concurrent_calls:,} calls "
            f"with {WINDOW} in flight. Both sides publish requests with a confirm and `mandatory=True` "
            f"to a durable queue (prefetch {PREFETCH}), reply over direct reply-to to one long-lived "
            "reply consumer with a future per correlation id, and the server acks after replying. "
            "Client CPU is per sequential call; server CPU is per call over the whole round."
        ),
        variants=VARIANTS,
        baseline="raw",
        parameters={
            "warmup_calls": setup.warmup,
            "sequential_calls": setup.calls,
            "concurrent_calls": setup.concurrent_calls,
            "window": WINDOW,
            "prefetch": PREFETCH,
            "rounds": rounds,
        },
        metrics=[
            metric("p50_ms", "sequential latency p50", "ms"),
            metric("p99_ms", "sequential latency p99", "ms"),
            metric("calls_per_s", f"throughput, {WINDOW} in flight", "calls/s", higher_is_better=True),
            metric("client_cpu_us", "client CPU, sequential", "µs/call"),
            metric("server_cpu_us", "server CPU", "µs/call"),
        ],
        target=Target(
            text=f"mrq/raw p50 ≤ {TARGET_RATIO}",
            metric="sequential latency p50",
            variant="mrq",
            limit=TARGET_RATIO,
            at_least=False,
        ),
        samples=samples,
    )
    result.evaluate_target()
    return result
