"""After a restart of the supervisor: adopt the instances it left behind, stop the rest.

An instance is adopted only when its pid AND its process start time match the
registry, so a pid that the kernel reused for another program is never
touched. Adopted instances must send a heartbeat within the start timeout,
or they are stopped and replaced. A process-group leader that carries this
state folder's marker in its environment but matches no configured instance is
stopped, so no orphan or duplicate remains even when the registry missed a
spawn. A helper that an adopted instance started in a group of its own is no
orphan: its parent chain leads to that instance, which stops it with itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import psutil
from loguru import logger

from supervisor.process import AdoptedProcess

if TYPE_CHECKING:
    from supervisor.node import Node

_LEFTOVER_STOP_TIMEOUT_S = 10.0


async def adopt_leftovers(node: Node) -> None:
    adopted: set[int] = set()
    for record in await node.registry.instances():
        if record.pid is None or record.start_time is None:
            continue
        process = AdoptedProcess.adopt(record.pid, record.start_time)
        if process is None:
            continue
        group = node.groups.get(record.service)
        if group is not None and record.index < group.replicas:
            instance = group.instances[record.index]
            instance.adoptable = process
            instance.restarts = record.restarts
            adopted.add(process.pid)
            logger.info(
                "found instance left running service={} instance={} pid={}",
                record.service,
                record.index,
                process.pid,
            )
        else:
            _stop_later(node, process, f"{record.service}:{record.index} is no longer configured")
            adopted.add(process.pid)
    for leader in await anyio.to_thread.run_sync(find_marked_leaders, node.state_dir):
        pid, start_time = leader.pid, leader.start_time
        if pid in adopted:
            continue
        # NOTE: a helper that forked twice to detach (setsid -f, a daemon) is reparented to
        # init, so it does not count as a helper of its instance and is stopped here.
        owner = next((ancestor for ancestor in leader.ancestors if ancestor in adopted), None)
        if owner is not None:
            logger.info("helper of an adopted instance kept pid={} instance_pid={}", pid, owner)
            continue
        process = AdoptedProcess.adopt(pid, start_time)
        if process is not None:
            _stop_later(node, process, "not in the registry (orphan of an earlier supervisor)")
    configured = set(node.groups)
    for service in await node.registry.services():
        if service.name not in configured:
            await node.registry.remove_service(service.name)


def _stop_later(node: Node, process: AdoptedProcess, reason: str) -> None:
    logger.warning("stopping leftover process pid={} reason={}", process.pid, reason)
    assert node.task_group is not None
    node.task_group.create_task(process.stop(_LEFTOVER_STOP_TIMEOUT_S))


@dataclass(frozen=True)
class MarkedLeader:
    """A process-group leader that carries a state folder's marker, with the pids of its ancestors."""

    pid: int
    start_time: float
    ancestors: tuple[int, ...]


def find_marked_leaders(state_dir: Path) -> list[MarkedLeader]:
    """Return the process-group leaders whose environment names `state_dir`."""
    from supervisor.node import ORPHAN_MARKER

    wanted = str(state_dir)
    found: list[MarkedLeader] = []
    own = os.getpid()
    for process in psutil.process_iter(["pid"]):
        pid = process.pid
        if pid == own:
            continue
        try:
            if os.getpgid(pid) != pid:
                continue
            if process.environ().get(ORPHAN_MARKER) != wanted:
                continue
            ancestors = tuple(parent.pid for parent in process.parents())
            found.append(MarkedLeader(pid, process.create_time(), ancestors))
        except (psutil.Error, OSError):
            continue
    return found
