"""Spawn, signal, watch and reap the OS process of one service instance.

A process is watched through a pidfd, so its exit is noticed as soon as the kernel reports
it, without polling. Stopping escalates from a polite signal to SIGKILL for the whole
process group and survives the caller's cancellation. Descendants that left the group
(a helper started in a session of its own) are killed once the process is gone.
"""

from __future__ import annotations

import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGKILL, SIGTERM, Signals, pidfd_send_signal

import anyio
import psutil
from loguru import logger

START_TIME_TOLERANCE_S = 0.05
"""Largest difference between two readings of one process's start time."""

KILL_TIMEOUT_S = 5.0
"""Default time that stop() waits for a process to exit after SIGKILL."""

OUTPUT_FILE_MODE = 0o640
"""Permission bits of a newly created stdout or stderr file, before the umask."""

_OUTPUT_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_REAP_RETRY_S = 0.001


class ProcessError(Exception):
    """Base class of the errors raised by supervisor.process."""


class SpawnError(ProcessError):
    """A process could not be started."""


class StopError(ProcessError):
    """A process did not exit after SIGKILL."""


@dataclass(frozen=True)
class SpawnSpec:
    """Program, environment, working directory and output files of a process to spawn."""

    argv: Sequence[str]
    env: Mapping[str, str]
    """The complete environment of the child: nothing is inherited from the supervisor."""
    cwd: Path
    stdout_path: Path
    stderr_path: Path
    """May be the same path as stdout_path, so both streams go to one file."""


@dataclass(frozen=True)
class ExitStatus:
    """Exit code or terminating signal of a process. Both are None when it is unknown."""

    code: int | None
    signal: int | None

    @classmethod
    def unknown(cls) -> ExitStatus:
        """Return the status of a process that exited but could not be reaped by us."""
        return cls(code=None, signal=None)

    @classmethod
    def from_wait_status(cls, wait_status: int) -> ExitStatus:
        """Decode the status word returned by os.waitpid for an exited process."""
        returncode = os.waitstatus_to_exitcode(wait_status)
        if returncode < 0:
            return cls(code=None, signal=-returncode)
        return cls(code=returncode, signal=None)

    @property
    def success(self) -> bool:
        """Whether the process exited with code 0."""
        return self.code == 0

    @property
    def returncode(self) -> int | None:
        """Exit code, or the negated signal number as in subprocess, or None when unknown."""
        if self.signal is not None:
            return -self.signal
        return self.code

    def describe(self) -> str:
        """Return a short phrase such as "exit code 1" or "killed by SIGKILL"."""
        if self.signal is not None:
            return f"killed by {_signal_name(self.signal)}"
        if self.code is not None:
            return f"exit code {self.code}"
        return "exit status unknown"


def process_start_time(pid: int) -> float | None:
    """Return when process pid was created, in seconds since the epoch, or None if it is gone.

    The kernel counts it in clock ticks of 10 ms (USER_HZ is 100 on Linux), and a zombie still
    has it.
    """
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def same_process(pid: int, start_time: float) -> bool:
    """Return whether pid still names the process that started at start_time.

    A pid is reused after its process is reaped, so the start time distinguishes the two.
    """
    current_start_time = process_start_time(pid)
    if current_start_time is None:
        return False
    return abs(current_start_time - start_time) <= START_TIME_TOLERANCE_S


class WatchedProcess(ABC):
    """A process whose exit is watched through a pidfd, and which can be stopped.

    ChildProcess and AdoptedProcess share this interface. Subclasses decide how the exit
    status is collected and whether a signal may still be sent.
    """

    def __init__(self, pid: int, pgid: int, pidfd: int, start_time: float) -> None:
        self._pid = pid
        self._pgid = pgid
        self._pidfd = pidfd
        self._start_time = start_time
        self._exit_status: ExitStatus | None = None
        self._wait_lock = anyio.Lock()
        self._stop_requested = False
        self._group_outlived_leader = False

    @property
    def pid(self) -> int:
        """Process id."""
        return self._pid

    @property
    def pgid(self) -> int:
        """Process group id, which stop() and kill_group() signal."""
        return self._pgid

    @property
    def start_time(self) -> float:
        """Creation time in seconds since the epoch, as process_start_time() returns it."""
        return self._start_time

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the process ended, or None while it runs or before wait() has noticed its exit."""
        return self._exit_status

    @property
    def returncode(self) -> int | None:
        """Exit code, or the negated signal number, or None while running or when unknown."""
        if self._exit_status is None:
            return None
        return self._exit_status.returncode

    async def wait(self) -> ExitStatus:
        """Wait until the process exits and return its status.

        Any number of tasks may wait at once. One of them watches the pidfd while the others
        queue on a lock, and a cancelled watcher hands the watch to the next task.
        """
        async with self._wait_lock:
            while self._exit_status is None:
                await anyio.wait_readable(self._pidfd)
                if not self._finish():
                    # A readable pidfd means the process is a zombie, so reaping succeeds at
                    # once. The sleep only keeps a disagreement between the two from spinning.
                    await anyio.sleep(_REAP_RETRY_S)
            return self._exit_status

    async def stop(
        self, timeout_s: float, signal: int = SIGTERM, *, kill_timeout_s: float = KILL_TIMEOUT_S
    ) -> ExitStatus:
        """Stop the process group and return the leader's exit status.

        Send signal to the group, wait up to timeout_s, then send SIGKILL to the group. Once
        the leader has exited, SIGKILL also reaches every process left in its group, and
        every descendant that it had before the first signal, in whatever group or session,
        if that process still runs. If the caller is cancelled, the same happens before the
        cancellation propagates. Calling stop() again, or after the exit, is safe.

        Raises StopError if the leader has not exited kill_timeout_s after SIGKILL.
        """
        self._stop_requested = True
        if self._exit_status is not None:
            self._kill_leftovers()
            return self._exit_status

        descendants: list[tuple[int, float]] = []
        try:
            descendants = await anyio.to_thread.run_sync(self._descendants)
            return await self._terminate(timeout_s, signal, kill_timeout_s)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._kill_after_cancel(kill_timeout_s)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_kill_survivors, descendants)

    def _descendants(self) -> list[tuple[int, float]]:
        """Return (pid, start time) of the descendants, or none when the pid may name another process."""
        if not self._may_signal():
            return []
        found = _descendants(self._pid)
        # Checked again: the pid might have been reused while the list was built.
        return found if self._may_signal() else []

    def send_signal(self, sig: int) -> None:
        """Send sig to the process alone. Does nothing once the process has exited."""
        if self._exit_status is None and self._may_signal():
            self._send_to_process(sig)

    def kill_group(self) -> None:
        """Send SIGKILL to every process of the group, the leader included."""
        if self._exit_status is None:
            self._signal_group(SIGKILL)
        else:
            self._kill_leftovers()

    async def _terminate(self, timeout_s: float, signal: int, kill_timeout_s: float) -> ExitStatus:
        self._signal_group(signal)
        with anyio.move_on_after(timeout_s):
            return await self.wait()

        logger.warning(
            "process stop timed out, sending SIGKILL pid={} signal={} timeout_s={}",
            self._pid,
            _signal_name(signal),
            timeout_s,
        )
        return await self._kill(kill_timeout_s)

    async def _kill(self, kill_timeout_s: float) -> ExitStatus:
        self._signal_group(SIGKILL)
        with anyio.move_on_after(kill_timeout_s):
            return await self.wait()

        raise StopError(
            f"process pid={self._pid} did not exit within kill_timeout_s={kill_timeout_s} "
            f"after SIGKILL; it is probably in uninterruptible sleep (state D in ps), so check "
            f"/proc/{self._pid}/stack and the device or file system it waits for"
        )

    async def _kill_after_cancel(self, kill_timeout_s: float) -> None:
        try:
            status = await self._kill(kill_timeout_s)
        except StopError as exc:
            logger.error("process kill after cancel failed pid={} error={}", self._pid, exc)
            return
        logger.warning("process killed after cancel pid={} status={}", self._pid, status.describe())

    def _finish(self) -> bool:
        """Collect the exit status of the exited process. Return False if it is not ready."""
        if self._stop_requested and self._leads_group():
            # A child's unreaped leader keeps the group id from being reused. An adopted
            # leader may be reaped already, so its group may contain only leftover processes.
            _kill_group_quietly(self._pgid)

        status = self._collect_status()
        if status is None:
            return False

        self._group_outlived_leader = self._leads_group() and _group_exists(self._pgid)
        os.close(self._pidfd)
        self._exit_status = status
        logger.debug(
            "process exited pid={} status={} group_outlived_leader={}",
            self._pid,
            status.describe(),
            self._group_outlived_leader,
        )
        return True

    def _kill_leftovers(self) -> None:
        # NOTE: once the group is empty its id can name a new group. The window is from the
        # last member's exit until this call, and only a reused pid that leads a group is hit.
        if self._group_outlived_leader:
            _kill_group_quietly(self._pgid)

    def _signal_group(self, sig: int) -> None:
        # After the exit the pidfd is closed and a reaped leader no longer pins the group id.
        if self._exit_status is not None or not self._may_signal():
            return
        if not self._leads_group():
            self._send_to_process(sig)
            return
        try:
            os.killpg(self._pgid, sig)
        except ProcessLookupError:
            return
        logger.debug("process group signalled pgid={} signal={}", self._pgid, _signal_name(sig))

    def _send_to_process(self, sig: int) -> None:
        # The pidfd names this process even if its pid has been reused.
        try:
            pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return
        logger.debug("process signalled pid={} signal={}", self._pid, _signal_name(sig))

    def _leads_group(self) -> bool:
        return self._pgid == self._pid

    def _may_signal(self) -> bool:
        return True

    @abstractmethod
    def _collect_status(self) -> ExitStatus | None:
        """Return the exit status of the exited process, or None if it cannot be read yet."""


class _UnreapedPopen(subprocess.Popen[bytes]):
    """Popen that leaves reaping to ChildProcess.

    Popen.__del__ calls waitpid and queues a running child for subprocess._cleanup(), which
    calls waitpid again later. Either would take the exit status from ChildProcess.
    """

    def __del__(self) -> None:
        pass


class ChildProcess(WatchedProcess):
    """A process that this supervisor spawned and reaps.

    The child leads its own session and process group and has no pipe to the supervisor,
    so it outlives the supervisor and can be adopted by its next run.
    """

    @classmethod
    async def spawn(cls, spec: SpawnSpec) -> ChildProcess:
        """Start spec.argv and return once the program has been executed.

        If the caller is cancelled meanwhile, the new process is killed and reaped before the
        cancellation propagates, so a cancelled spawn leaves no process behind.

        Raises SpawnError naming the program, the cwd or the output file, with the OS error.
        """
        # Popen returns after the child's exec, and vfork suspends the calling thread until
        # then. That took 0.2-0.3 ms on an idle 2-core VM but several ms with both cores
        # busy, so it runs in a worker thread, which added about 0.2 ms (test_spawn_latency
        # prints the figures). The shield keeps the pid from being lost when the caller is
        # cancelled while the thread runs.
        with anyio.CancelScope(shield=True):
            pid = await anyio.to_thread.run_sync(_start_process, spec)

        # Until it is reaped, the child keeps its pid and its /proc entry, so neither the
        # pidfd nor the start time can belong to another process.
        pidfd = os.pidfd_open(pid)
        start_time = psutil.Process(pid).create_time()
        child = cls(pid=pid, pgid=pid, pidfd=pidfd, start_time=start_time)
        logger.debug("process spawned pid={} program={}", pid, spec.argv[0])

        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await child._kill_after_cancel(KILL_TIMEOUT_S)
            raise
        return child

    def _collect_status(self) -> ExitStatus | None:
        try:
            pid, wait_status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            logger.warning("process reaped elsewhere, exit status lost pid={}", self._pid)
            return ExitStatus.unknown()
        if pid == 0:
            return None
        return ExitStatus.from_wait_status(wait_status)


class AdoptedProcess(WatchedProcess):
    """A process that an earlier run of the supervisor spawned and that is not our child.

    Its exit is noticed through a pidfd like a child's, but its parent reaps it, not us, so
    the exit status is unknown. The start time is checked again before every signal.
    """

    @classmethod
    def adopt(cls, pid: int, start_time: float) -> AdoptedProcess | None:
        """Return the process pid if it runs and started at start_time, else None."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None

        # The start time is checked after pidfd_open, so a match proves that the pidfd refers
        # to that process.
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = None
        if pgid is None or not same_process(pid, start_time):
            os.close(pidfd)
            return None

        logger.debug("process adopted pid={} pgid={}", pid, pgid)
        return cls(pid=pid, pgid=pgid, pidfd=pidfd, start_time=start_time)

    def _leads_group(self) -> bool:
        # Never signal the supervisor's own group, whatever the adopted process leads.
        return self._pgid == self._pid and self._pgid != os.getpgrp()

    def _may_signal(self) -> bool:
        return same_process(self._pid, self._start_time)

    def _collect_status(self) -> ExitStatus | None:
        return ExitStatus.unknown()


def _start_process(spec: SpawnSpec) -> int:
    if not spec.argv:
        raise SpawnError("argv is empty; expected the program followed by its arguments")

    stdout_fd = _open_output_file(spec.stdout_path)
    try:
        same_file = spec.stderr_path == spec.stdout_path
        stderr_fd = stdout_fd if same_file else _open_output_file(spec.stderr_path)
        try:
            return _popen(spec, stdout_fd, stderr_fd)
        finally:
            if stderr_fd != stdout_fd:
                os.close(stderr_fd)
    finally:
        os.close(stdout_fd)


def _popen(spec: SpawnSpec, stdout_fd: int, stderr_fd: int) -> int:
    try:
        process = _UnreapedPopen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout_fd,
            stderr=stderr_fd,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, ValueError) as exc:
        raise SpawnError(_describe_spawn_failure(spec, exc)) from exc
    return process.pid


def _describe_spawn_failure(spec: SpawnSpec, exc: OSError | ValueError) -> str:
    program = spec.argv[0]
    cwd = str(spec.cwd)
    if isinstance(exc, ValueError):
        return f"cannot start program {program!r}: invalid argv or env: {exc}"

    # Popen names the cwd as the filename when chdir failed in the child.
    if exc.filename is not None and str(exc.filename) == cwd:
        return (
            f"cannot start program {program!r}: cwd {cwd!r} failed: {exc.strerror}; "
            f"expected an existing directory that the supervisor's user may enter"
        )
    return (
        f"cannot start program {program!r} in cwd {cwd!r}: {exc.strerror}; "
        f"expected an executable file path or a program name on the child's PATH"
    )


def _open_output_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, _OUTPUT_FILE_FLAGS, OUTPUT_FILE_MODE)
    except OSError as exc:
        raise SpawnError(
            f"cannot open output file {str(path)!r} for appending: {exc.strerror}; "
            f"check that its folder can be created and written to"
        ) from exc


def _descendants(pid: int) -> list[tuple[int, float]]:
    """Return (pid, start time) of every descendant of pid, found by parent pid."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            found.append((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            continue
    return found


def _kill_survivors(processes: list[tuple[int, float]]) -> None:
    """SIGKILL each process of the list that still runs, with the group that it leads.

    The start time proves that a pid still names the same process. While that process
    lives and leads a group, the group id cannot name another group.
    """
    for pid, start_time in processes:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            # Checked after pidfd_open, so a match proves that the pidfd names that process.
            if not same_process(pid, start_time):
                continue
            leads_group = os.getpgid(pid) == pid
            if leads_group:
                os.killpg(pid, SIGKILL)
            else:
                pidfd_send_signal(pidfd, SIGKILL)
        except ProcessLookupError:
            continue
        finally:
            os.close(pidfd)
        logger.debug("process descendant killed pid={} group={}", pid, leads_group)


def _group_exists(pgid: int) -> bool:
    """Return whether any process, a zombie included, is in group pgid."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, SIGKILL)
    except ProcessLookupError:
        return
    logger.debug("process group signalled pgid={} signal=SIGKILL", pgid)


def _signal_name(sig: int) -> str:
    try:
        return Signals(sig).name
    except ValueError:
        return f"signal {sig}"
