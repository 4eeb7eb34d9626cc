"""`Client`: send, call and emit from outside a service (a web app, a script, tests)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sdk.connection import Broker
from sdk.messenger import Messenger
from sdk.settings import SettingsModel, settings


class Client:
    """A connection for sending messages, calling routes and emitting events.

    Without arguments it uses the process settings; keyword arguments
    (`broker_url`, `exchange`, `rpc_timeout_s`, ...) override them::

        async with Client() as client:
            total = await client.call("billing.quote", {"items": 3})
    """

    def __init__(self, broker_url: str | None = None, *, name: str = "client", **overrides: Any) -> None:
        if broker_url is not None:
            overrides["broker_url"] = broker_url
        self.settings: SettingsModel = settings.resolve(**overrides)
        self.broker = Broker(self.settings, connection_name=f"mrq {name} pid={os.getpid()}")
        self.messenger = Messenger(self.broker)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self.broker.connect()
        try:
            await self.messenger.start()
        except BaseException:
            await self.broker.close()
            raise

    async def close(self) -> None:
        await self.broker.close()

    async def send(self, target: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Send a one-way message to `target`; raise NoRoute when nothing consumes it."""
        await self.messenger.send(target, body, headers=headers)

    async def call(
        self,
        target: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call `target` and return its reply; raise RemoteError, NoRoute or RpcTimeout."""
        return await self.messenger.call(target, body, timeout=timeout, headers=headers)

    async def emit(self, event: str, body: Any = None, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish an event to every subscriber; an event nobody subscribes to is dropped."""
        await self.messenger.emit(event, body, headers=headers)
