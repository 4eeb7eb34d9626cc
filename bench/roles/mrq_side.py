"""The mrq side of the throughput and RPC benchmarks: `ServiceHost` consumers and `Client` senders.

Roles (the first argument): consumer, producer, rpc-server, rpc-client. Each
runs on uvloop, as the worker does, and reports with `bench.roles.protocol`.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from typing import Any

import uvloop

from bench.roles.protocol import cpu_s, emit, now_s, params, payload, role
from sdk import Client, microservice
from sdk.runtime import ServiceHost
from sdk.service import registry
from sdk.settings import SettingsModel, settings


def _settings(p: dict[str, Any]) -> SettingsModel:
    return settings.resolve(
        broker_url=p["broker_url"],
        exchange=p["exchange"],
        prefetch=p["prefetch"],
        concurrency=p["prefetch"],
        rpc_timeout_s=p["call_timeout_s"],
    )


class Counter:
    """A trivial handler that counts deliveries and notes when the first and the last arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first_s = 0.0
        self.first_cpu_s = 0.0
        self.done = asyncio.Event()

    async def handle(self, body: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.first_s, self.first_cpu_s = now_s(), cpu_s()
        if self.count == self.expected:
            self.done.set()


async def consume(p: dict[str, Any]) -> None:
    """Serve one route until `messages` deliveries are handled and acked, then report."""
    counter = Counter(p["messages"])
    microservice(p["route"], service=p["service"])(counter.handle)
    host = ServiceHost(registry.specs(), _settings(p))
    async with asyncio.timeout(p["deadline_s"]):
        await host.start()
        emit("ready")
        await counter.done.wait()
        # A runner is idle once every handler returned and its ack was written.
        await host.runners[0].idle.wait()
        end_s, end_cpu_s = now_s(), cpu_s()
        emit(
            "result",
            messages=counter.count,
            first_s=counter.first_s,
            end_s=end_s,
            cpu_s=end_cpu_s - counter.first_cpu_s,
        )
        await host.stop()


async def produce(p: dict[str, Any]) -> None:
    """Send `messages` one-way messages with `window` sends in flight, then report."""
    count = p["messages"]
    client = Client(p["broker_url"], exchange=p["exchange"], name="bench-producer")
    async with asyncio.timeout(p["deadline_s"]):
        await client.connect()
        try:
            sequence = itertools.count()

            async def send_some() -> None:
                while (index := next(sequence)) < count:
                    await client.send(p["target"], payload(index))

            start_s, start_cpu_s = now_s(), cpu_s()
            async with asyncio.TaskGroup() as tasks:
                for _ in range(min(p["window"], count)):
                    tasks.create_task(send_some())
            emit("result", messages=count, start_s=start_s, end_s=now_s(), cpu_s=cpu_s() - start_cpu_s)
        finally:
            await client.close()


async def serve_rpc(p: dict[str, Any]) -> None:
    """Reply to calls on one route with their own body until SIGTERM, then report CPU and calls."""
    calls = 0

    async def echo(body: Any) -> Any:
        nonlocal calls
        calls += 1
        return body

    microservice(p["route"], service=p["service"])(echo)
    host = ServiceHost(registry.specs(), _settings(p))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with asyncio.timeout(p["deadline_s"]):
        await host.start()
        emit("ready")
        start_cpu_s = cpu_s()
        await stop.wait()
        emit("result", calls=calls, cpu_s=cpu_s() - start_cpu_s)
        await host.stop()


async def call_rpc(p: dict[str, Any]) -> None:
    """Warm up, time sequential calls one by one, then time calls with `window` in flight."""
    client = Client(p["broker_url"], exchange=p["exchange"], name="bench-rpc-client")
    target = p["target"]
    async with asyncio.timeout(p["deadline_s"]):
        await client.connect()
        try:
            for index in range(p["warmup"]):
                await client.call(target, payload(index))
            latencies_s = []
            sequential_cpu_s = cpu_s()
            for index in range(p["calls"]):
                started = time.perf_counter()
                await client.call(target, payload(index))
                latencies_s.append(time.perf_counter() - started)
            sequential_cpu_s = cpu_s() - sequential_cpu_s
            concurrent = await _concurrent_calls(client, target, p["concurrent_calls"], p["window"])
            emit("result", latencies_s=latencies_s, sequential_cpu_s=sequential_cpu_s, **concurrent)
        finally:
            await client.close()


async def _concurrent_calls(client: Client, target: str, count: int, window: int) -> dict[str, float]:
    sequence = itertools.count()

    async def call_some() -> None:
        while (index := next(sequence)) < count:
            await client.call(target, payload(index))

    start_s, start_cpu_s = now_s(), cpu_s()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(min(window, count)):
            tasks.create_task(call_some())
    return {"concurrent_s": now_s() - start_s, "concurrent_cpu_s": cpu_s() - start_cpu_s}


ROLES = {"consumer": consume, "producer": produce, "rpc-server": serve_rpc, "rpc-client": call_rpc}

if __name__ == "__main__":
    uvloop.run(ROLES[role()](params()))
