"""Passing the records of the standard logging module (aio-pika, aiormq) to loguru.

The SDK never calls this itself: the worker and the supervisor do, since
they own their processes' logging. A message that repeats (aio-pika logs
each reconnect attempt) is passed once, then at most once per
`REPEAT_INTERVAL_S` with the number of repeats left out.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

REPEAT_INTERVAL_S = 30.0

# The level of the logging module for each loguru level of the log_level setting.
STDLIB_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class ToLoguru(logging.Handler):
    """A logging handler that re-emits each record through loguru under the record's logger name."""

    def __init__(self) -> None:
        super().__init__()
        self._repeats: dict[tuple[str, str], tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        suppressed = self._suppressed(record.name, str(record.msg))
        if suppressed is None:
            return
        if suppressed:
            text += f" ({suppressed} similar lines left out)"
        level: str | int = record.levelno
        if record.levelname in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            level = record.levelname

        def keep_name(loguru_record: Record) -> None:
            loguru_record["name"] = record.name

        logger.patch(keep_name).opt(exception=record.exc_info or None).log(level, text)

    def _suppressed(self, name: str, template: str) -> int | None:
        """Return how many repeats were left out before this record, or None to leave it out."""
        key = (name, template)
        now = time.monotonic()
        last, count = self._repeats.get(key, (0.0, 0))
        if last and now - last < REPEAT_INTERVAL_S:
            self._repeats[key] = (last, count + 1)
            return None
        self._repeats[key] = (now, 0)
        if len(self._repeats) > 1000:
            self._repeats.clear()
        return count


def route_stdlib_logging(level: str) -> None:
    """Send every record of the logging module at `level` or above to loguru."""
    logging.basicConfig(handlers=[ToLoguru()], level=STDLIB_LEVELS[level.lower()], force=True)
