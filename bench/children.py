"""Child processes of a benchmark: start, read their JSON lines, stop and reap.

A child reports on stdout with the JSON lines of `bench.roles.protocol`.
Its stderr goes to a file in the run's log folder, and the tail of that
file is part of the error when the child fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

MAX_LINE_BYTES = 4 * 1024 * 1024
STOP_GRACE_S = 15.0
_STDERR_TAIL_LINES = 30


class ChildFailed(Exception):
    """A child process exited, timed out or reported something other than expected."""


@dataclass
class ChildProcess:
    """A started child with its stdout reader and the file that receives its stderr."""

    label: str
    process: Process
    stderr_path: Path
    started_s: float
    _stdout: BufferedByteReceiveStream

    @property
    def pid(self) -> int:
        return self.process.pid

    async def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        """Return the next line whose "event" is `event`; raise ChildFailed on exit or timeout."""
        with anyio.move_on_after(timeout_s):
            while True:
                line = await self._next_line(event)
                if line.get("event") == event:
                    return line
        raise ChildFailed(
            f"{self.label} (pid {self.pid}) sent no {event!r} line within {timeout_s:g} s; "
            f"its stderr ends with:\n{self.stderr_tail()}"
        )

    async def _next_line(self, expected: str) -> dict[str, Any]:
        try:
            raw = await self._stdout.receive_until(b"\n", MAX_LINE_BYTES)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            code = await self._wait_briefly()
            raise ChildFailed(
                f"{self.label} (pid {self.pid}) exited with code {code} before sending {expected!r}; "
                f"its stderr ends with:\n{self.stderr_tail()}"
            ) from None
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            return {"event": "unparsed", "text": raw.decode(errors="replace")}
        return line if isinstance(line, dict) else {"event": "unparsed", "text": repr(line)}

    async def _wait_briefly(self) -> int | None:
        with anyio.move_on_after(5.0):
            return await self.process.wait()
        return None

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the child to exit by itself; raise ChildFailed after `timeout_s`."""
        with anyio.move_on_after(timeout_s):
            return await self.process.wait()
        raise ChildFailed(f"{self.label} (pid {self.pid}) did not exit within {timeout_s:g} s")

    def terminate(self) -> None:
        """Send SIGTERM and return at once; a child that reports on SIGTERM can then be read."""
        self._signal(signal.SIGTERM)

    async def expect_exit(self, timeout_s: float) -> None:
        """Wait for the child to exit by itself; raise ChildFailed unless it exits with code 0."""
        code = await self.wait_exit(timeout_s)
        if code != 0:
            raise ChildFailed(
                f"{self.label} (pid {self.pid}) exited with code {code}; "
                f"its stderr ends with:\n{self.stderr_tail()}"
            )

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """Send SIGTERM, wait up to `grace_s`, then SIGKILL; always reap, even when cancelled."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self._signal(signal.SIGTERM)
                with anyio.move_on_after(grace_s):
                    await self.process.wait()
            if self.process.returncode is None:
                self._signal(signal.SIGKILL)
            code = await self.process.wait()
        return code

    def _signal(self, signum: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            self.process.send_signal(signum)

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(stderr file {self.stderr_path} unreadable: {exc})"
        return "\n".join(lines[-_STDERR_TAIL_LINES:]) or "(empty)"

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment without MRQ_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRQ_") and k != "SETTINGS_MODULE"}
    env.update(extra)
    return env


@asynccontextmanager
async def spawn(
    argv: Sequence[str],
    *,
    label: str,
    log_dir: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ChildProcess]:
    """Start `argv` and yield it; on exit stop and reap it whatever happened."""
    safe_label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    stderr_path = log_dir / f"{safe_label}-{time.time_ns()}.stderr"
    with stderr_path.open("wb") as stderr:
        started_s = time.monotonic()
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=cwd,
            env=dict(env) if env is not None else child_env({}),
        )
    assert process.stdout is not None
    child = ChildProcess(label, process, stderr_path, started_s, BufferedByteReceiveStream(process.stdout))
    try:
        yield child
    finally:
        await child.stop()
        with anyio.CancelScope(shield=True):
            await process.aclose()
