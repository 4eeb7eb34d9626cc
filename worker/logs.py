"""Logging of a worker process: loguru to stderr, as text or JSON lines.

stderr is the instance's log file, which the supervisor opened for it.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from loguru import logger

from sdk.logbridge import route_stdlib_logging


def _json_sink(extra: dict[str, Any]) -> Any:
    def sink(message: Any) -> None:
        record = message.record
        line: dict[str, Any] = {
            "time": record["time"].timestamp(),
            "level": record["level"].name.lower(),
            "message": record["message"],
            "module": record["name"],
            **extra,
        }
        if record["exception"] is not None:
            line["exception"] = "".join(_format_exception(record["exception"]))
        sys.stderr.write(orjson.dumps(line, default=str).decode() + "\n")
        sys.stderr.flush()

    return sink


def _format_exception(exception: Any) -> list[str]:
    import traceback

    return traceback.format_exception(exception.type, exception.value, exception.traceback)


def configure(level: str, fmt: str, *, service: str, instance: int) -> None:
    """Send every log line of the process to stderr, with the instance in each line."""
    logger.remove()
    logger.enable("sdk")
    logger.enable("worker")
    route_stdlib_logging(level)
    if fmt == "json":
        logger.add(_json_sink({"service": service, "instance": instance}), level=level.upper())
        return
    logger.add(
        sys.stderr,
        level=level.upper(),
        format=(
            f"{{time:YYYY-MM-DD HH:mm:ss.SSS}} {{level: <7}} {service}.{instance} " + "{name}: {message}"
        ),
        backtrace=False,
        diagnose=False,
        colorize=False,
    )
