"""The machine and software versions that a benchmark ran on, for the report."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import psutil

GIB = 1024**3


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(rabbitmq_version: str) -> dict[str, Any]:
    """Return the machine's CPU, cores, memory, kernel and the versions of what the benchmarks use."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "rabbitmq": rabbitmq_version,
        "aio_pika": _version("aio-pika"),
        "uvloop": _version("uvloop"),
    }


def load_average() -> tuple[float, float, float]:
    """Return the 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def summary_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"{machine['kernel']}, {machine['python']}, RabbitMQ {machine['rabbitmq']}, "
        f"aio-pika {machine['aio_pika']}, uvloop {machine['uvloop']}"
    )
