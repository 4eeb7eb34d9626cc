"""The other nodes, as the dashboard shows them: status polls, commands and live events.

Everything travels through the control plane (`supervisor.ctlclient`), signed with
the cluster key. The status of every node is asked for every STATUS_INTERVAL_S while
at least one page is open and the control server knows other nodes; otherwise the
dashboard sends no status command.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import anyio
from loguru import logger

from sdk.errors import MrqError, NoRoute
from sdk.wire import Event
from supervisor.control import PeerBook
from supervisor.ctlclient import ControlClient, Gathered, follow_events

if TYPE_CHECKING:
    from supervisor.node import Node

__all__ = ["Cluster", "ClusterError", "EventFanout"]

STATUS_INTERVAL_S: Final = 2.0
STATUS_TIMEOUT_S: Final = 2.0
# A read of the overview polls at once when the last poll is older than this.
STALE_AFTER_S: Final = 2 * STATUS_INTERVAL_S
COMMAND_TIMEOUT_S: Final = 3.0
# How long a node that accepted a command gets to finish it (a rolling restart can take long).
COMMAND_WAIT_S: Final = 300.0
EVENTS_RETRY_S: Final = 5.0
SUBSCRIBER_BACKLOG: Final = 1000


class ClusterError(MrqError):
    """A command to another node failed; the message names the node and the fix."""

    def __init__(self, message: str, *, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code


class EventFanout:
    """Hands every event (as a JSON-able dict) to each open page's queue."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in tuple(self._queues):
            if not queue.full():  # a page that stopped reading loses events instead of growing memory
                queue.put_nowait(event)


class Cluster:
    """Polls the other nodes' status and forwards their commands and events."""

    def __init__(self, node: Node, fanout: EventFanout, watchers: Callable[[], int]) -> None:
        self.node = node
        self.fanout = fanout
        self.watchers = watchers
        self.remote: dict[str, dict[str, Any]] = {}
        self.missing: list[str] = []
        self.errors: dict[str, str] = {}
        self.polled_at: float | None = None
        self._polled_mono = -math.inf
        self._poll_lock = anyio.Lock()
        self._client: ControlClient | None = None
        self._poll_error: str | None = None

    async def start(self) -> None:
        """Open the control client; without a broker, the dashboard shows this node only."""
        node = self.node
        if node.broker is None:
            return
        client = ControlClient(node.broker, node.key, sender=f"dashboard {node.node} pid {os.getpid()}")
        await client.start()
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def run(self) -> None:
        """Poll the status of every node and follow the other nodes' events until cancelled."""
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._poll_loop)
            task_group.start_soon(self._remote_events_loop)
            task_group.start_soon(self._local_events_loop)

    def _others_known(self) -> bool:
        """Say whether the control server has seen other nodes; without one, assume it has."""
        for extension in self.node.extensions:
            peers = getattr(extension, "peers", None)
            if isinstance(peers, PeerBook):
                return any(name != self.node.node for name in peers.known())
        return True

    async def _poll_loop(self) -> None:
        while True:
            if self.watchers() > 0:
                began = time.monotonic()
                await self.refresh()
                await anyio.sleep(max(0.1, STATUS_INTERVAL_S - (time.monotonic() - began)))
            else:
                await anyio.sleep(0.5)

    async def refresh(self) -> None:
        """Poll the other nodes' status unless the last poll is recent or no other node is known."""
        if self._client is None or not self._others_known():
            self.remote, self.missing, self.errors = {}, [], {}
            return
        async with self._poll_lock:
            if time.monotonic() - self._polled_mono >= STATUS_INTERVAL_S * 0.9:
                await self._poll()

    async def refresh_if_stale(self) -> None:
        """Poll now when the last poll is older than STALE_AFTER_S, as when no page streams."""
        if time.monotonic() - self._polled_mono >= STALE_AFTER_S or not self._others_known():
            await self.refresh()

    async def _poll(self) -> None:
        """Ask every node for its status once and keep the replies of the other nodes."""
        self._polled_mono = time.monotonic()
        try:
            gathered = await self._gather("status", {"missing_ok": True}, None, STATUS_TIMEOUT_S, 1.0)
        except ClusterError as exc:
            self._note_poll_error(str(exc))
            return
        self._note_poll_error(None)
        own = self.node.node
        self.remote = {
            name: _without_bookkeeping(reply.result)
            for name, reply in gathered.replies.items()
            if name != own and reply.ok and isinstance(reply.result, dict)
        }
        self.errors = {name: str(r.error) for name, r in gathered.replies.items() if not r.ok}
        self.missing = [name for name in gathered.missing if name != own]
        self.polled_at = time.time()

    def _note_poll_error(self, error: str | None) -> None:
        if error != self._poll_error and error is not None:
            logger.warning("dashboard status poll failed node={} error={}", self.node.node, error)
        elif error is None and self._poll_error is not None:
            logger.info("dashboard status poll works again node={}", self.node.node)
        self._poll_error = error

    async def command(self, node: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a command on another node and return its result; raise ClusterError on any failure."""
        gathered = await self._gather(name, args, node, COMMAND_TIMEOUT_S, COMMAND_WAIT_S)
        reply = gathered.replies.get(node)
        if reply is None:
            if gathered.unfinished:
                raise ClusterError(
                    f"node {node} accepted {name!r} but sent no result within {COMMAND_WAIT_S:g} s; "
                    "see the events for what happened",
                    status_code=504,
                )
            raise ClusterError(
                f"node {node} did not reply to {name!r} within {COMMAND_TIMEOUT_S:g} s; "
                "check that its supervisor runs",
                status_code=504,
            )
        if not reply.ok:
            raise ClusterError(f"node {node}: {reply.error}", status_code=400)
        return _without_bookkeeping(reply.result)

    async def gather_all(self, name: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Run a read command on every other node; return the results of those that replied."""
        if self._client is None:
            return {}
        try:
            gathered = await self._gather(name, args, None, STATUS_TIMEOUT_S, STATUS_TIMEOUT_S)
        except ClusterError:
            return {}
        own = self.node.node
        return {
            node: _without_bookkeeping(reply.result)
            for node, reply in gathered.replies.items()
            if node != own and reply.ok
        }

    async def _gather(
        self, name: str, args: dict[str, Any], node: str | None, timeout_s: float, wait_s: float
    ) -> Gathered:
        client = self._client
        if client is None:
            raise ClusterError("this supervisor has no broker connection, so it cannot reach other nodes")
        try:
            with anyio.fail_after(timeout_s + wait_s + 5.0):
                return await client.gather(name, args, node=node, timeout_s=timeout_s, wait_s=wait_s)
        except NoRoute:
            where = f"node {node!r} is" if node else "no supervisor is"
            raise ClusterError(f"{where} not running on this broker", status_code=404) from None
        except TimeoutError:
            raise ClusterError(f"command {name!r} timed out", status_code=504) from None
        except MrqError as exc:
            raise ClusterError(f"command {name!r} failed: {exc}") from exc

    async def _local_events_loop(self) -> None:
        queue = self.node.events.subscribe()
        try:
            while True:
                event = await queue.get()
                self.fanout.publish(event.model_dump(mode="json"))
        finally:
            self.node.events.unsubscribe(queue)

    async def _remote_events_loop(self) -> None:
        """Forward the events that other nodes publish on the control exchange."""
        broker = self.node.broker
        if broker is None:
            return
        own = self.node.node
        while True:
            try:
                # follow_events is an async generator typed as its AsyncIterator protocol.
                feed = cast(AsyncGenerator[Event, None], follow_events(broker, self.node.key))
                async with contextlib.aclosing(feed) as events:
                    async for event in events:
                        if event.node != own:
                            self.fanout.publish(event.model_dump(mode="json"))
            except Exception as exc:  # the broker's errors vary; log and follow again later
                logger.warning("dashboard event feed failed node={} error={}; retrying", own, exc)
            await anyio.sleep(EVENTS_RETRY_S)


def _without_bookkeeping(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        return {}
    return {key: value for key, value in result.items() if key != "known_nodes"}
