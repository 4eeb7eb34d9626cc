"""Inputs and failures that once broke the SDK: each must end in a clear outcome, never a stuck queue."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel, field_validator

from sdk import Client, Context, DefinitionError, RemoteError, Retry, Service, SettingsError, route
from sdk.errors import HandlerTimeout
from sdk.runtime import ServiceHost
from sdk.service import microservice, registry
from sdk.settings import SettingsModel, settings

pytestmark = pytest.mark.anyio


async def _depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await connection.close()


async def _wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_process_killing_message_is_dead_lettered_once(
    tmp_path: Path, broker_url: str, unique: str
) -> None:
    """A message whose handler kills the process ends in the dead-letter queue, without copies."""
    service = f"killer{unique}"
    journal = tmp_path / "journal"
    (tmp_path / "killer_svc.py").write_text(
        textwrap.dedent(
            f"""
            import os
            from sdk import Service, route

            class Killer(Service):
                name = {service!r}

                @route("work")
                async def work(self, ctx):
                    with open({str(journal)!r}, "a") as handle:
                        handle.write(f"{{ctx.headers.get('x-mrq-redeliveries', 0)}}\\n")
                    os._exit(3)
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "MRQ_TARGET": "killer_svc",
        "MRQ_BROKER_URL": broker_url,
        "MRQ_EXCHANGE": f"t{unique}",
        "MRQ_MAX_REDELIVERIES": "2",
        "MRQ_RETRY_DELAY_S": "0.05",
    }
    dead = f"{service}.work.dead"
    async with Client(broker_url, exchange=f"t{unique}") as client:
        # The first worker declares the queues; then the poison message arrives.
        starter = await _start_worker(env)
        try:
            await _wait_until(lambda: _exists(broker_url, dead), 30, "the worker's queues")
            await client.send(f"{service}.work", {"poison": True})
            await asyncio.wait_for(starter.wait(), 30)
            # Restart the worker as a supervisor would, until the message is dead-lettered.
            for _ in range(8):
                if await _depth(broker_url, dead) == 1:
                    break
                worker = await _start_worker(env)
                try:
                    await asyncio.wait_for(worker.wait(), 6)
                except TimeoutError:
                    worker.terminate()
                    await asyncio.wait_for(worker.wait(), 30)
        finally:
            if starter.returncode is None:
                starter.kill()
                await starter.wait()
    runs = journal.read_text().split()
    assert await _depth(broker_url, dead) == 1
    assert await _depth(broker_url, f"{service}.work") == 0
    assert runs == ["0", "1", "2"], f"the handler ran {len(runs)} times with counts {runs}"


async def _start_worker(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", env=env, stderr=asyncio.subprocess.DEVNULL
    )


async def _exists(url: str, queue: str) -> bool:
    try:
        await _depth(url, queue)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    return True


@pytest.mark.timeout(90)
async def test_drained_deliveries_are_not_counted_as_redelivered(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"drain{unique}"
    flags: list[bool] = []

    class Slow(Service):
        name = service
        prefetch = 10
        concurrency = 1

        @route("work")
        async def work(self, ctx: Context) -> None:
            flags.append(ctx.redelivered)
            await asyncio.sleep(0.05)

    resolved = settings.resolve(broker_url=broker_url, exchange=mrq_settings.exchange, max_redeliveries=1)
    async with Client(broker_url, exchange=mrq_settings.exchange) as client:
        for _round in range(4):
            host = ServiceHost(registry.specs(), resolved)
            await host.start()
            if _round == 0:
                await asyncio.gather(*(client.send(f"{service}.work", {"n": n}) for n in range(30)))
            await asyncio.sleep(0.2)
            await host.stop()
        host = ServiceHost(registry.specs(), resolved)
        await host.start()
        await _wait_until(lambda: _all_done(len(flags), 30), 30, "every message handled")
        await host.stop()
    assert len(flags) == 30
    assert not any(flags), "a delivery that no handler ran was marked redelivered"
    assert await _depth(broker_url, f"{service}.work.dead") == 0


async def _all_done(count: int, total: int) -> bool:
    return count >= total


class Strict(BaseModel):
    code: str

    @field_validator("code")
    @classmethod
    def _reject(cls, value: str) -> str:
        raise TypeError(f"validator crashed on {value!r}")


class Unencodable(BaseModel):
    value: Any


@pytest.mark.timeout(60)
async def test_odd_outcomes_never_leave_a_delivery_unacked(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"odd{unique}"

    class Odd(Service):
        name = service
        prefetch = 2

        @route("strict")
        async def strict(self, body: Strict) -> str:
            return body.code

        @route("reply")
        async def reply(self, ctx: Context) -> Unencodable:
            return Unencodable(value=object())

        @route("attempt")
        async def attempt(self, ctx: Context) -> None:
            raise RuntimeError("always")

    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(broker_url, exchange=mrq_settings.exchange) as client:
        for _ in range(3):
            with pytest.raises(RemoteError, match="validator crashed"):
                await client.call(f"{service}.strict", {"code": "x"}, timeout=10)
            with pytest.raises(RemoteError, match="cannot encode the reply"):
                await client.call(f"{service}.reply", None, timeout=10)
        await client.send(f"{service}.attempt", {"n": 1}, headers={"x-mrq-attempt": 5000})
        await _wait_until(
            lambda: _has(broker_url, f"{service}.attempt.dead", 1),
            20,
            "the high-attempt message dead-lettered",
        )
    assert await _depth(broker_url, f"{service}.strict.dead") == 3


async def _has(url: str, queue: str, count: int) -> bool:
    return await _depth(url, queue) >= count


@pytest.mark.timeout(60)
async def test_handler_timeout_fails_the_call(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"slow{unique}"

    class Sleepy(Service):
        name = service

        @route("nap", timeout_s=0.2)
        async def nap(self, ctx: Context) -> str:
            await asyncio.sleep(30)
            return "late"

    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(broker_url, exchange=mrq_settings.exchange) as client:
        began = time.monotonic()
        with pytest.raises(RemoteError, match=r"longer than timeout_s=0\.2") as caught:
            await client.call(f"{service}.nap", None, timeout=10)
        assert caught.value.type == HandlerTimeout.__name__
        assert time.monotonic() - began < 5


@pytest.mark.timeout(30)
async def test_unsendable_headers_and_bodies_raise_before_publishing(
    mrq_settings: SettingsModel, broker_url: str
) -> None:
    async with Client(broker_url, exchange=mrq_settings.exchange, max_message_bytes=1000) as client:
        with pytest.raises(ValueError, match="header 'score' is nan"):
            await client.send("any.route", {}, headers={"score": float("nan")})
        with pytest.raises(ValueError, match=r"header 'meta\.when' is inf"):
            await client.send("any.route", {}, headers={"meta": {"when": float("inf")}})
        with pytest.raises(ValueError, match="header 'pair' has type tuple"):
            await client.send("any.route", {}, headers={"pair": (1, 2)})
        with pytest.raises(ValueError, match="more than max_message_bytes=1000"):
            await client.send("any.route", "x" * 2000)
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            await client.call("any.route", {}, timeout=float("inf"))


def test_retry_rejects_non_finite_delay() -> None:
    with pytest.raises(ValueError, match="finite number"):
        Retry(delay_s=float("nan"))
    with pytest.raises(ValueError, match="finite number"):
        Retry(delay_s=float("inf"))


def test_settings_reject_infinite_durations() -> None:
    with pytest.raises(SettingsError, match="rpc_timeout_s"):
        settings.resolve(rpc_timeout_s=float("inf"))


@pytest.mark.parametrize("name", ["dead", "work.dead", "work.retry.500", "retry.1"])
def test_route_names_that_shadow_internal_queues_are_refused(name: str) -> None:
    with pytest.raises(DefinitionError, match="reserved"):
        route(name)


def test_handlers_with_unusable_parameters_are_refused(mrq_settings: SettingsModel) -> None:
    class Star(Service):
        name = "star"

        @route("go")
        async def go(self, *args: Any) -> None: ...

    with pytest.raises(DefinitionError, match=r"parameters a handler cannot fill \(args\)"):
        ServiceHost(registry.specs(), mrq_settings)


def test_generator_handlers_are_refused(mrq_settings: SettingsModel) -> None:
    @microservice(route="gen", service="gen")
    async def gen(ctx: Context) -> Any:
        yield 1

    with pytest.raises(DefinitionError, match="is a generator"):
        ServiceHost(registry.specs(), mrq_settings)


@pytest.mark.timeout(30)
async def test_static_and_coroutine_returning_handlers_run(
    mrq_settings: SettingsModel, broker_url: str, unique: str
) -> None:
    service = f"static{unique}"

    async def later(value: str) -> str:
        return value.upper()

    class Static(Service):
        name = service

        @route("shout")
        @staticmethod
        def shout(body: str) -> Any:
            return later(body)

    host = ServiceHost(registry.specs(), mrq_settings)
    async with host, Client(broker_url, exchange=mrq_settings.exchange) as client:
        assert await client.call(f"{service}.shout", "hi", timeout=10) == "HI"
