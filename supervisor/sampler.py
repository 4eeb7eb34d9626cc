"""psutil figures of every instance's process tree, sampled in a thread.

One pass reads the parent of every process once, then each tree's members;
asking psutil for each instance's children separately would scan /proc once
per instance.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class TreeFigures:
    cpu_percent: float
    rss_bytes: int
    open_files: int
    threads: int
    processes: int
    sampled_at: float


class Sampler:
    """Keeps the previous CPU times so that each sample reports CPU use since the last one."""

    def __init__(self) -> None:
        self._previous: dict[int, tuple[float, float]] = {}
        self._own = psutil.Process()
        self._own_previous: tuple[float, float] | None = None

    def sample(self, roots: list[int]) -> dict[int, TreeFigures]:
        """Return figures for each root pid that still exists (blocking: run it in a thread)."""
        children = _children_map()
        now = time.monotonic()
        figures: dict[int, TreeFigures] = {}
        for root in roots:
            tree = _tree(root, children)
            totals = _measure(tree)
            if totals is None:
                continue
            cpu_s, rss, files, threads, count = totals
            figures[root] = TreeFigures(
                cpu_percent=self._cpu_percent(root, cpu_s, now),
                rss_bytes=rss,
                open_files=files,
                threads=threads,
                processes=count,
                sampled_at=time.time(),
            )
        self._previous = {pid: value for pid, value in self._previous.items() if pid in figures}
        return figures

    def own(self) -> tuple[float, int]:
        """Return this supervisor's CPU percent since the last call and its RSS."""
        with self._own.oneshot():
            times = self._own.cpu_times()
            rss = self._own.memory_info().rss
        cpu_s = times.user + times.system
        now = time.monotonic()
        previous, self._own_previous = self._own_previous, (cpu_s, now)
        if previous is None or now <= previous[1]:
            return 0.0, rss
        return 100.0 * (cpu_s - previous[0]) / (now - previous[1]), rss

    def _cpu_percent(self, root: int, cpu_s: float, now: float) -> float:
        previous = self._previous.get(root)
        self._previous[root] = (cpu_s, now)
        if previous is None or now <= previous[1]:
            return 0.0
        return max(0.0, 100.0 * (cpu_s - previous[0]) / (now - previous[1]))


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for process in psutil.process_iter(["ppid"]):
        ppid = process.info.get("ppid")
        if ppid:
            children[ppid].append(process.pid)
    return children


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def _measure(tree: list[int]) -> tuple[float, int, int, int, int] | None:
    cpu_s = 0.0
    rss = files = threads = count = 0
    for pid in tree:
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                times = process.cpu_times()
                rss += process.memory_info().rss
                threads += process.num_threads()
                files += process.num_fds()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            if pid == tree[0]:
                return None
            continue
        cpu_s += times.user + times.system
        count += 1
    return cpu_s, rss, files, threads, count
