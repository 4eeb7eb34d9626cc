"""worker_cpu: CPU seconds that a worker spends per 10,000 messages, against a raw aio-pika consumer.

Each round preloads the consumer's queue with persistent ~200-byte JSON
messages, then starts the consumer and takes its CPU time (user + system,
read in the process itself) from its first delivery to its last. The worker
is `python -m worker` whose route only counts; the raw consumer decodes
each body with orjson and acks it. Both use a prefetch of PREFETCH.
"""

from __future__ import annotations

import json
from typing import Any

from loguru import logger

from bench.context import BenchContext, unique_suffix, variant_order
from bench.observer import ControlObserver, preload
from bench.results import BenchResult, summarize
from bench.workers import WorkerSetup, start_worker

NAME = "worker_cpu"
VARIANTS = {"worker": "python -m worker", "raw": "raw aio-pika consumer"}
PREFETCH = 256
PRELOAD_WINDOW = 256
PER_MESSAGES = 10_000
# The slowest rate at which a step still counts as running rather than stuck.
MIN_RATE_PER_S = 100.0
EXIT_TIMEOUT_S = 30.0


async def run(context: BenchContext) -> BenchResult:
    """Drain a preloaded queue with each variant in alternating order for the configured rounds."""
    messages = context.size(PER_MESSAGES, 1_000)
    rounds = context.rounds(5, 1)
    suffix = unique_suffix()
    setup = WorkerSetup(exchange=f"bench{suffix}", service=f"cpu{suffix}", prefetch=PREFETCH)
    raw_queue = f"rawcpu{suffix}"
    samples: list[dict[str, Any]] = []
    async with ControlObserver(context.broker_url, setup.control_exchange) as observer:
        for index in range(rounds):
            for variant in variant_order(index, list(VARIANTS)):
                queue = setup.service if variant == "worker" else raw_queue
                await observer.declare_queue(queue)
                await preload(context.broker_url, queue, messages, PRELOAD_WINDOW, _deadline_s(messages))
                sample = await _drain(context, setup, variant, raw_queue, messages, index)
                await _check_empty(observer, queue)
                samples.append({"round": index + 1, "variant": variant, **sample})
                logger.info(
                    "round done benchmark={} round={} variant={} cpu_s_per_10k={:.3f} msg_per_s={:.0f}",
                    NAME,
                    index + 1,
                    variant,
                    sample["cpu_s_per_10k"],
                    sample["msg_per_s"],
                )
    return _result(samples, messages, rounds)


def _deadline_s(messages: int) -> float:
    return messages / MIN_RATE_PER_S + 60.0


async def _drain(
    context: BenchContext, setup: WorkerSetup, variant: str, raw_queue: str, messages: int, index: int
) -> dict[str, float]:
    deadline_s = _deadline_s(messages)
    if variant == "worker":
        async with start_worker(context, setup, index, messages=messages) as child:
            report = await child.expect("result", deadline_s)
    else:
        params = {
            "broker_url": context.broker_url,
            "exchange": setup.exchange,
            "queue": raw_queue,
            "prefetch": PREFETCH,
            "messages": messages,
            "deadline_s": deadline_s,
        }
        argv = context.role_argv("raw_side", "consumer", json.dumps(params))
        async with context.spawn(argv, label=f"{NAME}-raw-consumer") as child:
            report = await child.expect("result", deadline_s)
            await child.expect_exit(EXIT_TIMEOUT_S)
    return {
        "cpu_s_per_10k": report["cpu_s"] / messages * PER_MESSAGES,
        "total_cpu_s": report["total_cpu_s"],
        "msg_per_s": messages / max(report["end_s"] - report["first_s"], 1e-9),
    }


async def _check_empty(observer: ControlObserver, queue: str) -> None:
    """Raise unless the consumer, which closed its connection before exiting, acked every message."""
    left = await observer.queue_depth(queue)
    if left:
        raise RuntimeError(
            f"queue {queue} still contains {left} messages after its consumer exited; "
            "the consumer reported messages that it did not ack"
        )


def _result(samples: list[dict[str, Any]], messages: int, rounds: int) -> BenchResult:
    variants = list(VARIANTS)
    return BenchResult(
        name=NAME,
        title="worker CPU per 10,000 messages",
        measured=(
            f"{messages:,} persistent ~200-byte JSON messages preloaded into a durable queue, then "
            "drained by a freshly started consumer process with prefetch "
            f"{PREFETCH}. CPU is the consumer's user+system time from its first delivery to its last, "
            "read in the process itself (`time.process_time()`), scaled to 10,000 messages, so start-up "
            "is not included. The second row is the CPU of the whole process, start-up included, from "
            "exec to its last message. Worker: `python -m worker` whose route handler only counts (mrq's "
            "decode, context, handler call and batched acks, plus heartbeats). Raw: `queue.consume` "
            "with `orjson.loads` and `message.ack()` per message. The worker starts consuming before it "
            "has finished starting (control listener, hello, log lines), so the end of its start-up "
            "falls inside the first figure."
        ),
        variants=VARIANTS,
        baseline="raw",
        parameters={"messages_per_round": messages, "rounds": rounds, "prefetch": PREFETCH},
        metrics=[
            summarize(
                samples, "cpu_s_per_10k", name="CPU", unit="s/10k msg", variants=variants, baseline="raw"
            ),
            summarize(
                samples,
                "total_cpu_s",
                name=f"CPU from exec to the last of {messages:,} messages",
                unit="s",
                variants=variants,
                baseline="raw",
            ),
            summarize(
                samples,
                "msg_per_s",
                name="drain rate",
                unit="msg/s",
                variants=variants,
                baseline="raw",
                higher_is_better=True,
            ),
        ],
        notes=["The ratio to the raw consumer is the CPU that mrq adds per message on top of aio-pika."],
        samples=samples,
    )
