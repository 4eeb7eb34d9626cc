"""The child that every supervisor of the `supervisors` benchmark runs: a small aio-pika program.

It connects, declares an exclusive queue named after its pid, and publishes
one "ready" message with its pid to the control exchange. Then it consumes
that queue: a message whose body is `hang` blocks the event loop for good,
as a stuck handler would. SIGTERM closes the connection and exits with 0.

The parameters come as a JSON object in the BENCH_CHILD variable, so that
every supervisor runs the same command line without quoting rules:
broker_url, exchange (the control exchange), routing_key and deadline_s.
It imports nothing of mrq and runs on uvloop like the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

PARAMS_VARIABLE = "BENCH_CHILD"
HANG_BODY = b"hang"
HANG_S = 24 * 3600.0


async def on_command(message: AbstractIncomingMessage) -> None:
    if message.body == HANG_BODY:
        # Blocks the event loop on purpose: no callback, signal handler or AMQP heartbeat runs again.
        time.sleep(HANG_S)  # noqa: ASYNC251


async def main(params: dict[str, Any]) -> None:
    async with asyncio.timeout(params["deadline_s"]):
        connection = await aio_pika.connect(params["broker_url"])
        channel = await connection.channel()
        queue = await channel.declare_queue(f"bench-child-{os.getpid()}", exclusive=True)
        await queue.consume(on_command, no_ack=True)
        exchange = await channel.get_exchange(params["exchange"], ensure=False)
        body = json.dumps({"pid": os.getpid(), "queue": queue.name}).encode()
        await exchange.publish(aio_pika.Message(body), routing_key=params["routing_key"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    async with asyncio.timeout(params["deadline_s"]):
        await connection.close()


if __name__ == "__main__":
    uvloop.run(main(json.loads(os.environ[PARAMS_VARIABLE])))
