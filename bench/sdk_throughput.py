"""sdk_throughput: one-way persistent messages per second, mrq against raw aio-pika.

A producer process and a consumer process, both sides alike: persistent
~200-byte JSON bodies, publisher confirms with WINDOW publishes in flight,
`mandatory=True`, manual acks and a prefetch of PREFETCH. The mrq producer
calls `Client.send` from WINDOW tasks. The mrq consumer is a `ServiceHost`
whose handler only counts, so the measurement includes the SDK's decoding,
context, handler call and batched acks. The raw consumer decodes with orjson and
acks each message. Throughput runs from the producer's first publish to the
consumer's last ack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loguru import logger

from bench.context import BenchContext, unique_suffix, variant_order
from bench.results import BenchResult, Target, summarize

NAME = "sdk_throughput"
VARIANTS = {"mrq": "mrq", "raw": "raw aio-pika"}
WINDOW = 256
PREFETCH = 256
TARGET_RATIO = 0.9
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
# The slowest rate at which a round still counts as running rather than stuck.
MIN_RATE_PER_S = 100.0


@dataclass(frozen=True)
class _Setup:
    messages: int
    exchange: str
    service: str
    route: str
    raw_queue: str
    deadline_s: float


async def run(context: BenchContext) -> BenchResult:
    """Measure both variants in alternating order for the configured rounds."""
    messages = context.size(20_000, 2_000)
    rounds = context.rounds(7, 1)
    suffix = unique_suffix()
    setup = _Setup(
        messages=messages,
        exchange=f"bench{suffix}",
        service=f"tput{suffix}",
        route="ingest",
        raw_queue=f"rawtput{suffix}",
        deadline_s=messages / MIN_RATE_PER_S + READY_TIMEOUT_S,
    )
    samples: list[dict[str, Any]] = []
    for index in range(rounds):
        for variant in variant_order(index, list(VARIANTS)):
            sample = await _measure(context, setup, variant)
            samples.append({"round": index + 1, "variant": variant, **sample})
            logger.info(
                "round done benchmark={} round={} variant={} msg_per_s={:.0f} "
                "producer_cpu_us={:.0f} consumer_cpu_us={:.0f}",
                NAME,
                index + 1,
                variant,
                sample["msg_per_s"],
                sample["producer_cpu_us"],
                sample["consumer_cpu_us"],
            )
    return _result(samples, messages, rounds)


def _params(context: BenchContext, setup: _Setup) -> dict[str, Any]:
    return {
        "broker_url": context.broker_url,
        "exchange": setup.exchange,
        "prefetch": PREFETCH,
        "window": WINDOW,
        "messages": setup.messages,
        "deadline_s": setup.deadline_s,
        "call_timeout_s": setup.deadline_s,
    }


async def _measure(context: BenchContext, setup: _Setup, variant: str) -> dict[str, float]:
    params = _params(context, setup)
    if variant == "mrq":
        module = "mrq_side"
        consumer_params = {**params, "service": setup.service, "route": setup.route}
        producer_params = {**params, "target": f"{setup.service}.{setup.route}"}
    else:
        module = "raw_side"
        consumer_params = {**params, "queue": setup.raw_queue}
        producer_params = {**params, "target": setup.raw_queue}
    consumer_argv = context.role_argv(module, "consumer", json.dumps(consumer_params))
    producer_argv = context.role_argv(module, "producer", json.dumps(producer_params))
    async with context.spawn(consumer_argv, label=f"{NAME}-{variant}-consumer") as consumer:
        await consumer.expect("ready", READY_TIMEOUT_S)
        async with context.spawn(producer_argv, label=f"{NAME}-{variant}-producer") as producer:
            produced = await producer.expect("result", setup.deadline_s)
            await producer.expect_exit(EXIT_TIMEOUT_S)
        consumed = await consumer.expect("result", setup.deadline_s)
        await consumer.expect_exit(EXIT_TIMEOUT_S)
    elapsed_s = consumed["end_s"] - produced["start_s"]
    return {
        "msg_per_s": setup.messages / elapsed_s,
        "elapsed_s": elapsed_s,
        "producer_cpu_us": produced["cpu_s"] / setup.messages * 1e6,
        "consumer_cpu_us": consumed["cpu_s"] / setup.messages * 1e6,
    }


def _result(samples: list[dict[str, Any]], messages: int, rounds: int) -> BenchResult:
    variants = list(VARIANTS)
    metrics = [
        summarize(
            samples,
            "msg_per_s",
            name="throughput",
            unit="msg/s",
            variants=variants,
            baseline="raw",
            higher_is_better=True,
        ),
        summarize(
            samples, "producer_cpu_us", name="producer CPU", unit="µs/msg", variants=variants, baseline="raw"
        ),
        summarize(
            samples, "consumer_cpu_us", name="consumer CPU", unit="µs/msg", variants=variants, baseline="raw"
        ),
    ]
    result = BenchResult(
        name=NAME,
        title="one-way throughput, producer and consumer in two processes",
        measured=(
            "Persistent ~200-byte JSON messages from a producer process to a consumer process "
            f"through a topic exchange and a durable queue: publisher confirms with {WINDOW} in flight, "
            f"mandatory publishes, prefetch {PREFETCH}, manual acks. mrq: `Client.send` from {WINDOW} "
            "tasks into a `ServiceHost` route whose handler only counts (decode, context, handler call "
            "and batched acks included). Raw: `exchange.publish(Message(...), mandatory=True)` into "
            "`queue.consume(callback)` doing `orjson.loads` and `message.ack()`. Throughput runs from "
            "the producer's first publish to the consumer's last ack; CPU is each process's user+system "
            "time over its own work."
        ),
        variants=VARIANTS,
        baseline="raw",
        parameters={"messages_per_round": messages, "rounds": rounds, "window": WINDOW, "prefetch": PREFETCH},
        metrics=metrics,
        target=Target(
            text=f"mrq/raw throughput ≥ {TARGET_RATIO}",
            metric="throughput",
            variant="mrq",
            limit=TARGET_RATIO,
            at_least=True,
        ),
        samples=samples,
    )
    result.evaluate_target()
    return result
