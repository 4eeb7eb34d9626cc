"""Instance states and the restart policy: when to restart, after how long, and when to give up."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


class State(StrEnum):
    """The states of a service instance; every change is logged and published as an event."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    EXITED = "exited"
    FATAL = "fatal"


# States in which a process of the instance exists.
LIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.UNHEALTHY, State.STOPPING})

RestartMode = Literal["always", "on-failure", "never"]

# 2.0**1023 is the largest power of two that a float holds, and 2.0**1024 raises
# OverflowError. The delay is capped at backoff_max_s in any case.
_MAX_BACKOFF_EXPONENT = 1023


@dataclass
class RestartPolicy:
    """The restart settings of one service."""

    mode: RestartMode = "always"
    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 30.0
    jitter: float = 0.2


@dataclass
class RestartTracker:
    """Counts the restarts of one instance and computes the next backoff.

    The first restart after a stable run is immediate; each further one waits
    `backoff_initial_s * 2**(n-1)` with ±jitter, up to `backoff_max_s`. Only
    restarts that count (not those caused by a broker outage) go towards the
    `max_restarts` limit within `window_s`.
    """

    policy: RestartPolicy
    counted: deque[float] = field(default_factory=deque)
    consecutive: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def wants_restart(self, success: bool) -> bool:
        """Say whether the policy restarts after an exit that was (or was not) a success."""
        if self.policy.mode == "never":
            return False
        return not (self.policy.mode == "on-failure" and success)

    def ran_for(self, duration_s: float) -> None:
        """Forget the backoff after a run that lasted `stable_after_s` or longer."""
        if duration_s >= self.policy.stable_after_s:
            self.consecutive = 0

    def record(self, now: float, *, counts: bool) -> None:
        self.consecutive += 1
        if counts:
            self.counted.append(now)
        self._forget_before(now - self.policy.window_s)

    def too_many(self, now: float) -> bool:
        self._forget_before(now - self.policy.window_s)
        return len(self.counted) > self.policy.max_restarts

    def recent(self, now: float) -> int:
        self._forget_before(now - self.policy.window_s)
        return len(self.counted)

    def next_delay_s(self) -> float:
        """Return the wait before the restart just recorded: 0 for the first, then exponential."""
        if self.consecutive <= 1:
            return 0.0
        exponent = min(self.consecutive - 2, _MAX_BACKOFF_EXPONENT)
        base = self.policy.backoff_initial_s * 2.0**exponent
        jittered = base * (1 + self.rng.uniform(-self.policy.jitter, self.policy.jitter))
        return float(min(jittered, self.policy.backoff_max_s))

    def reset(self) -> None:
        """Start counting afresh (an operator started the instance)."""
        self.counted.clear()
        self.consecutive = 0

    def _forget_before(self, cutoff: float) -> None:
        while self.counted and self.counted[0] < cutoff:
            self.counted.popleft()


class StartSlots:
    """A limit on how many instances start at once.

    Fifty interpreters that start together share the cores, so the first is
    ready only when nearly all are. A slot is freed when its instance leaves
    `starting`, or after `hold_max_s` at the latest, so that one slow start
    does not hold up the others.
    """

    def __init__(self, slots: int, hold_max_s: float) -> None:
        self._semaphore = asyncio.Semaphore(slots)
        self.hold_max_s = hold_max_s

    async def acquire(self) -> StartSlot:
        await self._semaphore.acquire()
        slot = StartSlot(self._semaphore)
        slot.timer = asyncio.get_running_loop().call_later(self.hold_max_s, slot.release)
        return slot


class StartSlot:
    """A start slot in use. Calling `release()` again does nothing."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore: asyncio.Semaphore | None = semaphore
        self.timer: asyncio.TimerHandle | None = None

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        semaphore.release()
