"""The service that mrq-supervisor runs in the `supervisors` benchmark: `python -m worker --target` this.

Its default route blocks the event loop when asked, so that the worker stops
sending heartbeats: the hang that the supervisor must detect. The body names
a file. The first delivery writes its pid and `time.monotonic()` there, then
blocks. RabbitMQ redelivers the message to the replacement, which finds the
file and returns at once. The service name comes from MRQ_SERVICE_NAME, as
under the supervisor.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sdk import microservice

HANG_S = 24 * 3600.0


@microservice()
async def hang(body: dict[str, str]) -> None:
    record = Path(body["record"])
    if record.exists():  # noqa: ASYNC240
        return
    staging = record.with_suffix(".tmp")
    staging.write_text(json.dumps({"pid": os.getpid(), "blocked_s": time.monotonic()}))
    staging.rename(record)
    # time.sleep in a coroutine blocks the loop, and with it the heartbeats, as a stuck handler would.
    time.sleep(HANG_S)  # noqa: ASYNC251
