"""The smallest aio-pika process that does what a worker does to start: the floor of worker_start.

It connects, declares a durable queue, publishes one "ready" message to the
control exchange, then idles until SIGTERM (or `linger_s`) so that its
memory can be read. It imports nothing of mrq and runs on uvloop like the
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

import aio_pika
import uvloop


async def main(p: dict[str, Any]) -> None:
    async with asyncio.timeout(p["deadline_s"]):
        connection = await aio_pika.connect(p["broker_url"])
        channel = await connection.channel()
        await channel.declare_queue(p["queue"], durable=True)
        exchange = await channel.get_exchange(p["exchange"], ensure=False)
        body = json.dumps({"pid": os.getpid()}).encode()
        await exchange.publish(aio_pika.Message(body), routing_key=p["routing_key"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # Idling until linger_s is no error: the parent reads memory figures meanwhile.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), p["linger_s"])
    async with asyncio.timeout(p["deadline_s"]):
        await connection.close()


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[-1])))
