"""Applying a changed supervisor.toml to a running node."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.config import SupervisorConfig
from supervisor.group import ServiceGroup

if TYPE_CHECKING:
    from supervisor.node import Node

# [supervisor] keys that only a restart of the supervisor can apply.
_RESTART_ONLY = ("node", "broker", "exchange", "state_dir", "dashboard", "cluster_key", "cluster_key_file")


async def apply_reload(node: Node, new: SupervisorConfig, task_group: asyncio.TaskGroup) -> dict[str, Any]:
    """Add, remove, restart or scale only the services whose settings changed."""
    old_services = node.config.services
    added = sorted(set(new.services) - set(old_services))
    removed = sorted(set(old_services) - set(new.services))
    changed: list[str] = []
    scaled: dict[str, int] = {}
    for name in sorted(set(new.services) & set(old_services)):
        old, fresh = old_services[name], new.services[name]
        if old.fingerprint() != fresh.fingerprint():
            changed.append(name)
        elif old.replicas != fresh.replicas:
            scaled[name] = fresh.replicas
    ignored = [
        key for key in _RESTART_ONLY if getattr(node.config.supervisor, key) != getattr(new.supervisor, key)
    ]
    if ignored:
        logger.warning("reload ignores settings that need a supervisor restart keys={}", ",".join(ignored))

    for name in removed:
        group = node.groups.pop(name)
        await group.remove()
        await node.registry.remove_service(name)
    for name in added:
        group = ServiceGroup(node, name, new.services[name])
        node.groups[name] = group
        await group.scale(new.services[name].replicas, task_group)
    for name, replicas in scaled.items():
        group = node.groups[name]
        group.update_config(new.services[name])
        await group.scale(replicas, task_group)
    for name in changed:
        group = node.groups[name]
        group.update_config(new.services[name])
        # Restart the running instances first, then add any new ones: they start with
        # the new settings already and need no restart.
        keep = min(group.replicas, new.services[name].replicas)
        await group.restart_rolling(list(range(keep)))
        await group.scale(new.services[name].replicas, task_group)
    summary = {"added": added, "removed": removed, "changed": changed, "scaled": scaled, "ignored": ignored}
    logger.info("configuration reloaded {}", " ".join(f"{k}={v}" for k, v in summary.items() if v))
    return summary
