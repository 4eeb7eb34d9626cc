"""Logging of the supervisor process: loguru to stderr and to supervisor.log in the state folder."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

from sdk.logbridge import route_stdlib_logging
from supervisor.config import SupervisorSettings

LOG_FILE_NAME = "supervisor.log"


def configure(settings: SupervisorSettings) -> Path:
    """Send every log line to stderr and to the rotated supervisor.log; return the file's path."""
    logger.remove()
    logger.enable("sdk")
    logger.enable("supervisor")
    route_stdlib_logging(settings.log_level)
    level = settings.log_level.upper()
    serialize = settings.log_format == "json"
    text_format = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {name}: {message}"
    logger.add(
        sys.stderr, level=level, format=text_format, serialize=serialize, backtrace=False, diagnose=False
    )
    path = settings.state_dir / LOG_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(
        path,
        level=level,
        format=text_format,
        serialize=serialize,
        rotation=settings.log_max_bytes,
        retention=settings.log_backups + 1,
        backtrace=False,
        diagnose=False,
        enqueue=False,
    )
    return path
