"""Figures about this process read from /proc, without importing psutil (start time matters)."""

from __future__ import annotations

import os
import time

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes() -> int:
    """Return the resident set size of this process."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def _boot_time() -> float:
    with open("/proc/stat", "rb") as stat:
        for line in stat:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("btime not found in /proc/stat")


def _start_ticks(pid: int | None) -> int:
    with open(f"/proc/{pid or 'self'}/stat", "rb") as stat:
        data = stat.read()
    # The command name in brackets may contain spaces; the fields after it are fixed.
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[19])


def start_time(pid: int | None = None) -> float:
    """Return the process start time in UNIX seconds, computed the way psutil's create_time() does.

    The boot time in /proc/stat has whole seconds, so this identifies a process
    but is no clock: use `age_s()` to measure how long a process has run.
    """
    return _boot_time() + _start_ticks(pid) / _CLOCK_TICKS


def age_s(pid: int | None = None) -> float:
    """Return how long the process has existed, to the kernel's clock tick (usually 10 ms)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - _start_ticks(pid) / _CLOCK_TICKS
