"""The child side of the benchmark protocol: parameters in, JSON lines out.

A child prints one JSON object per line on stdout, each with an "event" key
("ready", "result", ...). Timestamps are `time.monotonic()` seconds, which on
Linux is one clock for every process on the machine, so the parent can
subtract a child's timestamp from another child's. CPU figures are
`time.process_time()` seconds: user plus system time of every thread.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def params() -> dict[str, Any]:
    """Return the parameters that the parent passed as a JSON object in the last argument."""
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} [ROLE] PARAMS_JSON")
    loaded = json.loads(sys.argv[-1])
    if not isinstance(loaded, dict):
        raise SystemExit(f"expected a JSON object as the last argument, got {sys.argv[-1]!r}")
    return loaded


def role() -> str:
    """Return the role argument that comes before the parameters."""
    if len(sys.argv) < 3:
        raise SystemExit(f"usage: {sys.argv[0]} ROLE PARAMS_JSON")
    return sys.argv[1]


def emit(event: str, **fields: Any) -> None:
    """Print one protocol line and flush it at once."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def now_s() -> float:
    return time.monotonic()


def cpu_s() -> float:
    return time.process_time()


def payload(sequence: int) -> dict[str, Any]:
    """Return the message body of the benchmarks: about 200 bytes once encoded as JSON."""
    return {
        "seq": sequence,
        "order_id": f"ord-{sequence:010d}",
        "customer": "customer-0042",
        "items": [{"sku": "sku-123456", "quantity": 2, "price_cents": 1999}],
        "currency": "EUR",
        "note": "deliver to the side entrance after 17:00",
        "priority": "normal",
    }
