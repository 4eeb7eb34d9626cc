"""Applying a changed supervisor.toml to a running node."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.config import SupervisorConfig, SupervisorSettings
from supervisor.group import ServiceGroup

if TYPE_CHECKING:
    from supervisor.node import Node

# [supervisor] keys that a reload applies at once. log_level also reaches the instances
# started after the reload. Every other key needs a restart of the supervisor.
LIVE_SETTINGS = ("log_max_bytes", "log_backups", "log_level")


def changed_settings(old: SupervisorSettings, new: SupervisorSettings) -> list[str]:
    """Return the names of the [supervisor] keys whose values differ, in declaration order."""
    return [key for key in SupervisorSettings.model_fields if getattr(old, key) != getattr(new, key)]


async def apply_reload(node: Node, new: SupervisorConfig, task_group: asyncio.TaskGroup) -> dict[str, Any]:
    """Add, remove, restart or scale only the services whose settings changed.

    Returns the summary: `added`, `removed`, `changed` and `scaled` services, the
    [supervisor] keys applied at once (`settings`) and those that need a supervisor
    restart (`ignored`), and `failed`, each service whose rolling restart stopped,
    with the reason.
    """
    settings, ignored = _apply_settings(node, new.supervisor)
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

    for name in removed:
        group = node.groups.pop(name)
        await group.remove()
        await node.registry.remove_service(name)
    for name in added:
        group = ServiceGroup(node, name, new.services[name])
        node.groups[name] = group
        await group.scale(new.services[name].replicas, task_group)
    for name in scaled:
        await node.groups[name].reconfigure(new.services[name], task_group, restart=False)
    failed: dict[str, str] = {}
    for name in changed:
        outcome = await node.groups[name].reconfigure(new.services[name], task_group, restart=True)
        if outcome is not None and not outcome.ok:
            failed[name] = outcome.describe()
    summary = {
        "added": added,
        "removed": removed,
        "changed": changed,
        "scaled": scaled,
        "settings": settings,
        "ignored": ignored,
        "failed": failed,
    }
    logger.info("configuration reloaded {}", " ".join(f"{k}={v}" for k, v in summary.items() if v))
    return summary


def _apply_settings(node: Node, new: SupervisorSettings) -> tuple[list[str], list[str]]:
    """Apply the changed keys of LIVE_SETTINGS; return them, and the other changed keys."""
    changed = changed_settings(node.settings, new)
    live = [key for key in changed if key in LIVE_SETTINGS]
    ignored = [key for key in changed if key not in LIVE_SETTINGS]
    if ignored:
        logger.warning("reload ignores settings that need a supervisor restart keys={}", ",".join(ignored))
    if live:
        node.apply_settings(node.settings.model_copy(update={key: getattr(new, key) for key in live}))
        logger.info("settings applied keys={}", ",".join(live))
    return live, ignored
