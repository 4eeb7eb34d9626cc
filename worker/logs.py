"""Logging of a worker process: loguru to stderr, as text or JSON lines.

stderr is the instance's log file, which the supervisor opened for it.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import orjson
from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# The level of the logging module for each loguru level of the log_level setting.
_STDLIB_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _ToLoguru(logging.Handler):
    """Passes the records of libraries that use the logging module (aio-pika, aiormq) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int = record.levelno
        if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            level = record.levelname

        def keep_name(loguru_record: Record) -> None:
            loguru_record["name"] = record.name

        logger.patch(keep_name).opt(exception=record.exc_info or None).log(level, record.getMessage())


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
    logging.basicConfig(handlers=[_ToLoguru()], level=_STDLIB_LEVELS[level.lower()], force=True)
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
