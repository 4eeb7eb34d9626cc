"""The service that the worker benchmarks run with `python -m worker --target bench.roles.worker_service`.

Its default route counts deliveries. With BENCH_MESSAGES=N it prints one
protocol line on stdout when the N-th delivery is handled: the CPU seconds
and the time from the first delivery to the N-th, and the CPU seconds since
the process started. The service name comes from MRQ_SERVICE_NAME, as under
the supervisor.
"""

from __future__ import annotations

import os
from typing import Any

from bench.roles.protocol import cpu_s, emit, now_s
from sdk import microservice

EXPECTED = int(os.environ.get("BENCH_MESSAGES", "0"))

_count = 0
_first_s = 0.0
_first_cpu_s = 0.0


@microservice()
async def count(body: Any) -> None:
    global _count, _first_s, _first_cpu_s
    _count += 1
    if _count == 1:
        _first_s, _first_cpu_s = now_s(), cpu_s()
    if _count == EXPECTED:
        end_cpu_s = cpu_s()
        emit(
            "result",
            messages=_count,
            first_s=_first_s,
            end_s=now_s(),
            cpu_s=end_cpu_s - _first_cpu_s,
            total_cpu_s=end_cpu_s,
        )
