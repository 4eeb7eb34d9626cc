"""A service: its configuration and its instances, scaled and restarted together."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.config import ServiceConfig
from supervisor.instance import Instance, policy_of
from supervisor.policy import State

if TYPE_CHECKING:
    from supervisor.node import NodeContext

_SETTLED = frozenset({State.STOPPED, State.EXITED, State.FATAL})
_GAVE_UP = frozenset({State.FATAL, State.EXITED})


@dataclass
class RollingRestart:
    """The outcome of a rolling restart of one service.

    `failed` is the index of the instance that did not run again, and `reason`
    says why. The rolling restart stopped there, so the instances in `skipped`
    kept their earlier process.
    """

    service: str
    restarted: list[int] = field(default_factory=list)
    failed: int | None = None
    reason: str | None = None
    skipped: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def describe(self) -> str:
        """Return one line for an operator: which instance failed, why, and what kept running."""
        if self.failed is None:
            return f"{self.service}: restarted {len(self.restarted)} instance(s)"
        kept = ", ".join(f"{self.service}:{index}" for index in self.skipped)
        rest = f"; {kept} kept running with the earlier process" if kept else ""
        return (
            f"rolling restart of {self.service} stopped at {self.service}:{self.failed}: "
            f"{self.reason}{rest}; see `mrq-supervisor logs {self.service}:{self.failed}`"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "restarted": self.restarted,
            "failed": self.failed,
            "reason": self.reason,
            "skipped": self.skipped,
        }


class ServiceGroup:
    """The instances 0..replicas-1 of one service, each supervised by its own task.

    Structural changes (scale, rolling restart, removal, new settings) take the
    group's lock, so two of them never interleave. Each one starts from the
    instances that the previous one left.
    """

    def __init__(self, ctx: NodeContext, name: str, config: ServiceConfig) -> None:
        self.ctx = ctx
        self.name = name
        self.config = config
        self.instances: list[Instance] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

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

    async def scale(self, replicas: int, task_group: asyncio.TaskGroup) -> int:
        """Add instances and start them, or stop and remove the highest-numbered ones.

        Returns the number of instances before, counted once the operations that came
        earlier have finished.
        """
        async with self._lock:
            before = self.replicas
            await self._scale(replicas, task_group)
            return before

    async def remove(self) -> None:
        """Stop every instance and end their tasks (the service left the configuration)."""
        async with self._lock:
            await self._scale(0, None)

    async def restart_rolling(
        self, indexes: list[int] | None = None, ready_timeout_s: float | None = None
    ) -> RollingRestart:
        """Restart instances one at a time, each after the previous one is running again.

        The service keeps consumers throughout when it has more than one instance. The
        restart stops at the first instance that goes fatal or exits instead, or that
        is not running within `ready_timeout_s`, which defaults to stop_timeout_s plus
        start_timeout_s. The instances after it keep their process.
        """
        async with self._lock:
            return await self._restart_rolling(indexes, ready_timeout_s)

    async def reconfigure(
        self, config: ServiceConfig, task_group: asyncio.TaskGroup, *, restart: bool
    ) -> RollingRestart | None:
        """Use new settings, restart the running instances one at a time with `restart`, then scale.

        Instances kept from before are restarted first; any new ones start with the new
        settings already and need no restart.
        """
        async with self._lock:
            self.update_config(config)
            outcome = None
            if restart:
                keep = min(self.replicas, config.replicas)
                outcome = await self._restart_rolling(list(range(keep)), None)
            await self._scale(config.replicas, task_group)
            return outcome

    def update_config(self, config: ServiceConfig) -> None:
        """Use new settings for the next start of each instance."""
        self.config = config
        for instance in self.instances:
            instance.config = config
            instance.tracker.policy = policy_of(config)

    async def _scale(self, replicas: int, task_group: asyncio.TaskGroup | None) -> None:
        before = self.replicas
        if len(self.instances) < replicas:
            if task_group is None:
                raise RuntimeError("adding instances needs the node's task group")
            while len(self.instances) < replicas:
                self.add_instance(task_group).request_start()
        if len(self.instances) > replicas:
            removed = self.instances[replicas:]
            for instance in removed:
                instance.request_stop()
            await self.wait_settled(removed)
            for instance in removed:
                self._tasks.pop(instance.index).cancel()
                self.ctx.instance_removed(instance)
            # The lock keeps other operations from adding instances meanwhile, so exactly
            # the stopped instances leave the list.
            self.instances = [i for i in self.instances if all(i is not r for r in removed)]
        if self.replicas != before:
            logger.info("service scaled service={} replicas={} before={}", self.name, self.replicas, before)

    async def _restart_rolling(
        self, indexes: list[int] | None, ready_timeout_s: float | None
    ) -> RollingRestart:
        chosen = [i for i in self.instances if indexes is None or i.index in indexes]
        outcome = RollingRestart(self.name)
        for position, instance in enumerate(chosen):
            timeout_s = ready_timeout_s
            if timeout_s is None:
                timeout_s = instance.config.stop_timeout_s + self.ctx.settings.start_timeout_s
            reason = await self._restart_one(instance, timeout_s)
            if reason is not None:
                outcome.failed, outcome.reason = instance.index, reason
                outcome.skipped = [i.index for i in chosen[position + 1 :]]
                logger.error(
                    "rolling restart stopped service={} instance={} reason={} skipped={}",
                    self.name,
                    instance.index,
                    reason,
                    outcome.skipped,
                )
                break
            outcome.restarted.append(instance.index)
        return outcome

    async def _restart_one(self, instance: Instance, timeout_s: float) -> str | None:
        """Restart one instance and wait until it runs; return why it did not, or None."""
        spawns = instance.spawns
        instance.request_restart()
        try:
            async with asyncio.timeout(timeout_s):
                await self.ctx.wait_for(lambda: _restarted(instance, spawns))
        except TimeoutError:
            return f"not running {timeout_s:g} s after the restart (state {instance.state})"
        if instance.state in _GAVE_UP:
            return f"{instance.state} after the restart: {instance.last_exit_reason or 'no reason recorded'}"
        return None


def _restarted(instance: Instance, spawns_before: int) -> bool:
    # request_restart() clears fatal and exited at once, so either state here is new.
    if instance.state in _GAVE_UP:
        return True
    return instance.spawns > spawns_before and instance.state == State.RUNNING
