"""A service: its configuration and its instances, scaled and restarted together."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.config import ServiceConfig
from supervisor.instance import Instance, policy_of
from supervisor.policy import State

if TYPE_CHECKING:
    from supervisor.node import NodeContext

_SETTLED = frozenset({State.STOPPED, State.EXITED, State.FATAL})


class ServiceGroup:
    """The instances 0..replicas-1 of one service, each supervised by its own task."""

    def __init__(self, ctx: NodeContext, name: str, config: ServiceConfig) -> None:
        self.ctx = ctx
        self.name = name
        self.config = config
        self.instances: list[Instance] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def replicas(self) -> int:
        return len(self.instances)

    def add_instance(self, task_group: asyncio.TaskGroup) -> Instance:
        instance = Instance(self.ctx, self.name, len(self.instances), self.config)
        self.instances.append(instance)
        self._tasks[instance.index] = task_group.create_task(instance.run(), name=f"instance {instance.name}")
        return instance

    def start_all(self) -> None:
        for instance in self.instances:
            instance.request_start()

    def stop_all(self) -> None:
        for instance in self.instances:
            instance.request_stop()

    async def wait_settled(self, instances: list[Instance] | None = None) -> None:
        """Wait until every given instance (default: all) has no process left."""
        targets = instances if instances is not None else self.instances
        await self.ctx.wait_for(lambda: all(i.state in _SETTLED for i in targets))

    async def scale(self, replicas: int, task_group: asyncio.TaskGroup) -> None:
        """Add instances and start them, or stop and remove the highest-numbered ones."""
        while len(self.instances) < replicas:
            self.add_instance(task_group).request_start()
        if len(self.instances) <= replicas:
            return
        removed = self.instances[replicas:]
        for instance in removed:
            instance.request_stop()
        await self.wait_settled(removed)
        for instance in removed:
            task = self._tasks.pop(instance.index)
            task.cancel()
            self.ctx.instance_removed(instance)
        del self.instances[replicas:]
        logger.info("service scaled service={} replicas={}", self.name, replicas)

    async def remove(self) -> None:
        """Stop every instance and end their tasks (the service left the configuration)."""
        await self.scale(0, asyncio.TaskGroup())

    async def restart_rolling(
        self, indexes: list[int] | None = None, ready_timeout_s: float | None = None
    ) -> None:
        """Restart instances one at a time, each after the previous one is running again.

        The service keeps consumers throughout when it has more than one instance.
        """
        chosen = [i for i in self.instances if indexes is None or i.index in indexes]
        timeout_s = ready_timeout_s if ready_timeout_s is not None else self.ctx.settings.start_timeout_s
        for instance in chosen:
            spawns = instance.spawns
            instance.request_restart()
            try:
                async with asyncio.timeout(timeout_s):
                    await self.ctx.wait_for(lambda i=instance, n=spawns: _restarted(i, n))  # type: ignore[misc]
            except TimeoutError:
                logger.warning(
                    "rolling restart continues without a ready instance service={} instance={} state={}",
                    self.name,
                    instance.index,
                    instance.state,
                )

    def update_config(self, config: ServiceConfig) -> None:
        """Use new settings for the next start of each instance."""
        self.config = config
        for instance in self.instances:
            instance.config = config
            instance.tracker.policy = policy_of(config)


def _restarted(instance: Instance, spawns_before: int) -> bool:
    if instance.state in (State.FATAL, State.EXITED):
        return True
    return instance.spawns > spawns_before and instance.state == State.RUNNING
