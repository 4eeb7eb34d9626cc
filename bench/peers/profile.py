"""The CPU profile of an idle supervisor: a py-spy recording, summed by function.

`py-spy record --format raw` writes one line per distinct stack, frames
from the root to the leaf separated by `;`, then the number of samples. By
default py-spy keeps only the samples in which a thread was running, not
waiting, so the samples add up to CPU time, at `rate` samples per second.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio

PROFILE_GRACE_S = 30.0
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME_LINE = re.compile(r":\d+\)$")
# Frames under which the real work of a thread runs, with a label for the samples in the frame itself.
ROOT_FRAMES = {
    "Runner.run (asyncio/runners.py)": "(event loop itself: uvloop's C code, polling, timers, reads)",
    "WorkerThread.run (anyio/_backends/_asyncio.py)": "(anyio worker thread between jobs)",
}


class ProfileError(Exception):
    """py-spy failed or wrote nothing readable."""


@dataclass
class Profile:
    """Samples of one recording: total, by leaf function (self) and by any function on the stack."""

    duration_s: float
    rate_hz: int
    samples: int = 0
    self_samples: Counter[str] = field(default_factory=Counter)
    total_samples: Counter[str] = field(default_factory=Counter)

    @property
    def cpu_s(self) -> float:
        """Estimated CPU seconds over the recording: samples divided by the sampling rate."""
        return self.samples / self.rate_hz

    def top(self, counter: Counter[str], count: int) -> list[tuple[str, int, float]]:
        """Return the `count` largest entries as (function, samples, share of all samples)."""
        if not self.samples:
            return []
        return [(name, n, n / self.samples) for name, n in counter.most_common(count)]


def frame_name(frame: str) -> str:
    """Drop the line number from `function (file.py:123)`, so that a function's lines add up."""
    return _FRAME_LINE.sub(")", frame.strip())


def work_frames(frames: list[str]) -> list[str]:
    """Return the frames below the last root frame, or the root's label when the root itself runs.

    Everything above a root frame (the CLI, `uvloop.run`, the thread start-up)
    is on every stack, so it tells nothing about where the time goes.
    """
    for index in range(len(frames) - 1, -1, -1):
        label = ROOT_FRAMES.get(frames[index])
        if label is not None:
            return frames[index + 1 :] or [label]
    return frames


def parse_raw(text: str, duration_s: float, rate_hz: int) -> Profile:
    """Sum the collapsed stacks of `py-spy record --format raw`."""
    profile = Profile(duration_s=duration_s, rate_hz=rate_hz)
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match["count"])
        frames = work_frames([frame_name(f) for f in match["stack"].split(";") if f.strip()])
        if not frames:
            continue
        profile.samples += count
        profile.self_samples[frames[-1]] += count
        for name in set(frames):
            profile.total_samples[name] += count
    return profile


async def record(py_spy: Path, pid: int, duration_s: float, rate_hz: int, output: Path) -> Profile:
    """Record process `pid` for `duration_s` without pausing it (`--nonblocking`), then sum the samples."""
    argv = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(rate_hz),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(output),
    ]
    with anyio.fail_after(duration_s + PROFILE_GRACE_S):
        result = await anyio.run_process(argv, check=False)
    if result.returncode != 0 or not await anyio.Path(output).exists():
        detail = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
        raise ProfileError(f"py-spy record of pid {pid} failed with exit code {result.returncode}: {detail}")
    return parse_raw(await anyio.Path(output).read_text(errors="replace"), duration_s, rate_hz)
