"""Server-sent events: a response that a producer coroutine writes frames to.

The producer runs in a task group next to two watchers: one waits for the client
to disconnect, the other for the dashboard to stop. Whichever ends first cancels
the rest, so no frame is written after a disconnect and an open page never delays
a stop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import orjson
from loguru import logger
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["SseResponse", "SseWriter"]

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


class SseWriter:
    """Writes `event:` / `data:` frames with JSON data to one client."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def event(self, name: str, data: Any) -> None:
        payload = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode()
        await self._write(f"event: {name}\ndata: {payload}\n\n")

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n")

    async def _write(self, frame: str) -> None:
        await self._send({"type": "http.response.body", "body": frame.encode(), "more_body": True})


Producer = Callable[[SseWriter], Awaitable[None]]


class SseResponse(Response):
    """Streams the frames that `producer` writes until it returns, the client leaves, or `closing` is set."""

    def __init__(self, producer: Producer, closing: anyio.Event) -> None:
        super().__init__(status_code=200)
        self.producer = producer
        self.closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [*SSE_HEADERS, *((k, v) for k, v in self.raw_headers if k != b"content-length")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        writer = SseWriter(send)
        gone = False
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(_until_disconnect, receive, task_group.cancel_scope)
                task_group.start_soon(_until_set, self.closing, task_group.cancel_scope)
                await self._produce(writer, scope.get("path", ""))
                task_group.cancel_scope.cancel()
        except* OSError:
            gone = True  # the client went away while a frame was being written
        if not gone:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _produce(self, writer: SseWriter, path: str) -> None:
        """Run the producer; an unexpected error is logged and sent to the page as an `error` frame."""
        try:
            await self.producer(writer)
        except OSError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error("dashboard stream failed path={}", path)
            await writer.event("error", {"error": f"{type(exc).__name__}: {exc}"})


async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _until_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
