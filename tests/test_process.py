"""Tests of supervisor.process with real processes, real files and real signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import stat
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from signal import SIGKILL, SIGTERM
from typing import Any

import anyio
import psutil
import pytest
import uvloop

from supervisor.process import (
    AdoptedProcess,
    ChildProcess,
    ExitStatus,
    SpawnError,
    SpawnSpec,
    StopError,
    WatchedProcess,
    process_start_time,
    same_process,
)

PYTHON = sys.executable
PR_SET_CHILD_SUBREAPER = 36
# Bound for every wait in these tests. pytest-timeout cannot always interrupt an event loop
# that waits in a callback, so a hang would otherwise last until the sleep 300 ends.
DEADLINE_S = 30.0
TERM_IGNORING_SLEEP = "trap '' TERM; echo ready; exec sleep 300"

# Runs its arguments as a child and reaps every process that is reparented to it, so the
# adopted processes of these tests have a parent that reaps them. PID 1 on some machines
# and containers does not reap orphans, which would leave zombies behind.
REAPER_SCRIPT = """
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""

Spawn = Callable[..., Awaitable[ChildProcess]]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("asyncio", {}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Spawn children for a test, then check that every one of them was reaped."""
    children: list[ChildProcess] = []

    async def spawn_child(argv: list[str], **spec_fields: Any) -> ChildProcess:
        child = await ChildProcess.spawn(make_spec(tmp_path, argv, **spec_fields))
        children.append(child)
        return child

    yield spawn_child

    unreaped = [child.pid for child in children if child.exit_status is None]
    for child in children:
        if child.exit_status is None:
            kill_and_reap(child.pid)
    assert unreaped == [], f"the test left children unreaped: {unreaped}"
    for child in children:
        assert not same_process(child.pid, child.start_time), f"pid {child.pid} remains"


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """Make this process the reaper of orphaned grandchildren, which the test lists.

    A killed orphan then becomes our zombie, so the test can see that it died and reap it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    orphans: list[int] = []
    yield orphans

    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    for pid in orphans:
        kill_and_reap(pid)


def make_spec(
    tmp_path: Path,
    argv: list[str],
    *,
    stdout_path: Path | None = None,
    stderr_path: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> SpawnSpec:
    return SpawnSpec(
        argv=argv,
        env=env if env is not None else {"PATH": os.environ["PATH"]},
        cwd=cwd if cwd is not None else tmp_path,
        stdout_path=stdout_path or tmp_path / "out.log",
        stderr_path=stderr_path or tmp_path / "err.log",
    )


def kill_and_reap(pid: int) -> None:
    """Kill pid and reap it if it is our child. Used only to clean up after a failed test."""
    try:
        os.kill(pid, SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


async def read_lines(path: Path, count: int, timeout_s: float = 20.0) -> list[str]:
    """Wait until path contains count complete lines and return them."""
    with anyio.fail_after(timeout_s):
        while True:
            text = read_text_if_exists(path)
            lines = text.splitlines()
            if text.endswith("\n") and len(lines) >= count:
                return lines
            await anyio.sleep(0.01)


async def wait_for(process: WatchedProcess, timeout_s: float = DEADLINE_S) -> ExitStatus:
    """Wait for process to exit, failing the test instead of hanging if it does not."""
    with anyio.fail_after(timeout_s):
        return await process.wait()


async def stop_within(
    process: WatchedProcess, deadline_s: float = DEADLINE_S, **stop_args: Any
) -> ExitStatus:
    """Stop process, failing the test instead of hanging if stop() does not return."""
    with anyio.fail_after(deadline_s):
        return await process.stop(**stop_args)


@contextlib.contextmanager
def stdin_replaced_by_pipe() -> Iterator[None]:
    saved_stdin = os.dup(0)
    read_fd, write_fd = os.pipe()
    try:
        os.dup2(read_fd, 0)
        yield
    finally:
        os.dup2(saved_stdin, 0)
        for fd in (saved_stdin, read_fd, write_fd):
            os.close(fd)


def read_text_if_exists(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def reap_zombie(pid: int) -> None:
    """Reap pid, which must be a zombie child of this process by now."""
    reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
    assert reaped_pid == pid


def group_members(pgid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except ProcessLookupError:
            continue
    return members


async def wait_for_session(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until pid leads a session of its own (setsid runs after the fork)."""
    with anyio.fail_after(timeout_s):
        while True:
            if os.getsid(pid) == pid:
                return
            await anyio.sleep(0.01)


async def wait_until_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until pid is a zombie or gone."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            await anyio.sleep(0.01)


def test_exit_status_describe() -> None:
    assert ExitStatus(code=1, signal=None).describe() == "exit code 1"
    assert ExitStatus(code=None, signal=SIGKILL).describe() == "killed by SIGKILL"
    assert ExitStatus(code=None, signal=99).describe() == "killed by signal 99"
    assert ExitStatus.unknown().describe() == "exit status unknown"


def test_exit_status_success_and_returncode() -> None:
    assert ExitStatus(code=0, signal=None).success
    assert not ExitStatus(code=2, signal=None).success
    assert not ExitStatus(code=None, signal=SIGTERM).success
    assert not ExitStatus.unknown().success
    assert ExitStatus(code=None, signal=SIGTERM).returncode == -SIGTERM
    assert ExitStatus(code=3, signal=None).returncode == 3
    assert ExitStatus.unknown().returncode is None


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_backend_runs_requested_loop(anyio_backend: tuple[str, dict[str, bool]]) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == anyio_backend[1].get("use_uvloop", False)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_exit_code_reported(spawn: Spawn) -> None:
    child = await spawn(["sh", "-c", "exit 3"])

    status = await wait_for(child)

    assert status == ExitStatus(code=3, signal=None)
    assert child.exit_status == status
    assert child.returncode == 3


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_signal_reported(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])
    assert child.exit_status is None
    assert child.returncode is None

    child.send_signal(SIGKILL)
    status = await wait_for(child)

    assert status == ExitStatus(code=None, signal=SIGKILL)
    assert status.describe() == "killed by SIGKILL"
    assert child.returncode == -SIGKILL


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_exit_noticed_at_once(spawn: Spawn) -> None:
    latencies_s = []
    for _ in range(10):
        child = await spawn(["sleep", "300"])
        started_at = time.perf_counter()
        os.kill(child.pid, SIGKILL)
        await wait_for(child)
        latencies_s.append(time.perf_counter() - started_at)

    print(
        f"exit notice after SIGKILL: median {statistics.median(latencies_s) * 1000:.3f} ms, "
        f"max {max(latencies_s) * 1000:.3f} ms"
    )
    assert max(latencies_s) < 1.0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_spawn_latency(spawn: Spawn, tmp_path: Path) -> None:
    spawn_call_s = []
    exec_delay_s = []
    python_delay_s = []
    for index in range(20):
        out = tmp_path / f"date-{index}.log"
        started_at = time.time()
        call_started_at = time.perf_counter()
        child = await spawn(["date", "+%s.%N"], stdout_path=out)
        spawn_call_s.append(time.perf_counter() - call_started_at)
        await wait_for(child)
        exec_delay_s.append(float(out.read_text()) - started_at)

        out = tmp_path / f"python-{index}.log"
        started_at = time.time()
        child = await spawn([PYTHON, "-c", "import time; print(time.time())"], stdout_path=out)
        await wait_for(child)
        python_delay_s.append(float(out.read_text()) - started_at)

    print(
        f"spawn() call median {statistics.median(spawn_call_s) * 1000:.3f} ms; "
        f"to date's clock reading {statistics.median(exec_delay_s) * 1000:.3f} ms; "
        f"to python's first line {statistics.median(python_delay_s) * 1000:.3f} ms (medians of 20)"
    )
    assert statistics.median(spawn_call_s) < 0.05
    assert statistics.median(exec_delay_s) < 0.1


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_output_appended_across_spawns(spawn: Spawn, tmp_path: Path) -> None:
    stdout_path = tmp_path / "logs" / "nested" / "out.log"
    stderr_path = tmp_path / "logs" / "nested" / "err.log"

    for run in (1, 2):
        script = f"echo out{run}; echo err{run} >&2"
        child = await spawn(["sh", "-c", script], stdout_path=stdout_path, stderr_path=stderr_path)
        assert (await wait_for(child)).success

    assert stdout_path.read_text() == "out1\nout2\n"
    assert stderr_path.read_text() == "err1\nerr2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(stdout_path.stat().st_mode) == 0o640 & ~umask


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_output_shared_file(spawn: Spawn, tmp_path: Path) -> None:
    log_path = tmp_path / "both.log"

    child = await spawn(
        ["sh", "-c", "echo out; echo err >&2; echo out2"],
        stdout_path=log_path,
        stderr_path=log_path,
    )
    await wait_for(child)

    assert log_path.read_text() == "out\nerr\nout2\n"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_child_gets_env_cwd_and_devnull(spawn: Spawn, tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    out = tmp_path / "env.log"
    env = {"PATH": os.environ["PATH"], "MRQ_TEST_VALUE": "42"}
    script = 'echo "$MRQ_TEST_VALUE"; echo "$HOME"; pwd; readlink /proc/$$/fd/0; cat'

    # Our own stdin becomes a pipe meanwhile, so a child that inherited it would show a pipe
    # and block in cat instead of reading end of file from /dev/null.
    with stdin_replaced_by_pipe():
        child = await spawn(["sh", "-c", script], stdout_path=out, env=env, cwd=work_dir)
    await wait_for(child)

    assert out.read_text().splitlines() == ["42", "", str(work_dir), "/dev/null"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_child_inherits_no_descriptor(spawn: Spawn, tmp_path: Path) -> None:
    out = tmp_path / "fds.log"
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    script = f"ls /proc/$$/fd/{write_fd} || echo closed"
    try:
        child = await spawn(["sh", "-c", script], stdout_path=out)
        await wait_for(child)
    finally:
        os.close(read_fd)
        os.close(write_fd)

    assert out.read_text() == "closed\n"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_child_leads_new_session(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])

    assert child.pgid == child.pid
    assert os.getpgid(child.pid) == child.pid
    assert os.getsid(child.pid) == child.pid
    assert child.start_time == process_start_time(child.pid)
    await stop_within(child, timeout_s=10)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_escalates_to_sigkill(spawn: Spawn, tmp_path: Path) -> None:
    child = await spawn(["sh", "-c", TERM_IGNORING_SLEEP])
    await read_lines(tmp_path / "out.log", 1)

    started_at = time.perf_counter()
    status = await stop_within(child, timeout_s=0.5)
    elapsed_s = time.perf_counter() - started_at

    assert status == ExitStatus(code=None, signal=SIGKILL)
    assert elapsed_s >= 0.5
    assert elapsed_s < 20


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_returns_on_sigterm(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])

    started_at = time.perf_counter()
    status = await stop_within(child, timeout_s=30)
    elapsed_s = time.perf_counter() - started_at

    assert status == ExitStatus(code=None, signal=SIGTERM)
    assert elapsed_s < 10


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_sends_requested_signal(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])

    status = await stop_within(child, timeout_s=30, signal=2)

    assert status == ExitStatus(code=None, signal=2)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_stop_after_exit_is_idempotent(spawn: Spawn) -> None:
    child = await spawn(["sh", "-c", "exit 4"])
    exited = await wait_for(child)

    first = await stop_within(child, timeout_s=1)
    second = await stop_within(child, timeout_s=1)

    assert first == exited
    assert second == exited


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_reaps_unwaited_exit(spawn: Spawn) -> None:
    child = await spawn(["sh", "-c", "exit 5"])
    await wait_until_dead(child.pid)

    status = await stop_within(child, timeout_s=10)

    assert status == ExitStatus(code=5, signal=None)


@pytest.mark.anyio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("leader_ignores_term", [False, True], ids=["leader-exits", "all-ignore"])
async def test_stop_kills_grandchildren(
    spawn: Spawn, tmp_path: Path, subreaper: list[int], leader_ignores_term: bool
) -> None:
    # The grandchild ignores SIGTERM, so only the SIGKILL sent to the group ends it.
    prefix = "trap '' TERM; " if leader_ignores_term else ""
    script = f"{prefix}(trap '' TERM; exec sleep 300) & echo $!; wait"
    child = await spawn(["sh", "-c", script])
    (grandchild_line,) = await read_lines(tmp_path / "out.log", 1)
    grandchild = int(grandchild_line)
    subreaper.append(grandchild)
    assert os.getpgid(grandchild) == child.pgid

    status = await stop_within(child, timeout_s=1)

    expected_signal = SIGKILL if leader_ignores_term else SIGTERM
    assert status == ExitStatus(code=None, signal=expected_signal)
    await wait_until_dead(grandchild)
    reap_zombie(grandchild)
    assert group_members(child.pgid) == []


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_kills_descendant_in_own_session(
    spawn: Spawn, tmp_path: Path, subreaper: list[int]
) -> None:
    # setsid gives the helper a session and a group of its own, out of reach of the group's signals.
    child = await spawn(["sh", "-c", "setsid sleep 300 & echo $!; exec sleep 300"])
    (helper_line,) = await read_lines(tmp_path / "out.log", 1)
    helper = int(helper_line)
    subreaper.append(helper)
    await wait_for_session(helper)
    assert os.getpgid(helper) != child.pgid

    status = await stop_within(child, timeout_s=5)

    assert status == ExitStatus(code=None, signal=SIGTERM)
    await wait_until_dead(helper)
    reap_zombie(helper)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_kill_group_after_exit_kills_leftovers(
    spawn: Spawn, tmp_path: Path, subreaper: list[int]
) -> None:
    child = await spawn(["sh", "-c", "sleep 300 & echo $!"])
    (grandchild_line,) = await read_lines(tmp_path / "out.log", 1)
    grandchild = int(grandchild_line)
    subreaper.append(grandchild)
    assert (await wait_for(child)).success

    child.kill_group()

    await wait_until_dead(grandchild)
    reap_zombie(grandchild)
    assert group_members(child.pgid) == []


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_cancelled_stop_still_kills(spawn: Spawn, tmp_path: Path) -> None:
    child = await spawn(["sh", "-c", TERM_IGNORING_SLEEP])
    await read_lines(tmp_path / "out.log", 1)

    with anyio.move_on_after(0.5) as scope:
        await stop_within(child, timeout_s=60)

    assert scope.cancelled_caught
    assert child.exit_status == ExitStatus(code=None, signal=SIGKILL)
    assert not same_process(child.pid, child.start_time)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_cancelled_stop_reraises_cancellation(spawn: Spawn, tmp_path: Path) -> None:
    child = await spawn(["sh", "-c", TERM_IGNORING_SLEEP])
    await read_lines(tmp_path / "out.log", 1)
    finished_stop = False

    async def stop_child() -> None:
        nonlocal finished_stop
        await stop_within(child, timeout_s=60)
        finished_stop = True

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(stop_child)
        await anyio.sleep(0.3)
        task_group.cancel_scope.cancel()

    assert not finished_stop
    assert child.exit_status == ExitStatus(code=None, signal=SIGKILL)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_stop_raises_when_kill_cannot_end_process(spawn: Spawn, tmp_path: Path) -> None:
    # A zero kill timeout ends the wait before SIGKILL can take effect, which simulates a
    # process in uninterruptible sleep.
    child = await spawn(["sh", "-c", TERM_IGNORING_SLEEP])
    await read_lines(tmp_path / "out.log", 1)

    with pytest.raises(StopError, match=rf"pid={child.pid} did not exit within kill_timeout_s=0"):
        await stop_within(child, timeout_s=0.2, kill_timeout_s=0)

    assert (await wait_for(child)).signal == SIGKILL


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_cancelled_spawn_leaves_no_process(tmp_path: Path) -> None:
    marker = "300.4242"

    with anyio.CancelScope() as scope:
        scope.cancel()
        await ChildProcess.spawn(make_spec(tmp_path, ["sleep", marker]))

    assert scope.cancelled_caught
    children = psutil.Process().children()
    assert [child.pid for child in children if child.status() == psutil.STATUS_ZOMBIE] == []
    assert [child.pid for child in children if marker in child.cmdline()] == []


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_spawn_missing_program_raises(spawn: Spawn) -> None:
    with pytest.raises(
        SpawnError, match=r"cannot start program 'no-such-program-mrq' in cwd .*: No such file"
    ):
        await spawn(["no-such-program-mrq", "--flag"])


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_spawn_missing_cwd_raises(spawn: Spawn, tmp_path: Path) -> None:
    missing = tmp_path / "missing-dir"

    with pytest.raises(SpawnError, match=rf"cwd '{missing}' failed: No such file or directory"):
        await spawn(["true"], cwd=missing)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_spawn_empty_argv_raises(spawn: Spawn) -> None:
    with pytest.raises(SpawnError, match="argv is empty"):
        await spawn([])


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_spawn_unwritable_output_raises(spawn: Spawn, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(SpawnError, match=rf"cannot open output file '{blocker}/out.log'"):
        await spawn(["true"], stdout_path=blocker / "out.log")


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_concurrent_waiters_get_same_status(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])
    statuses: list[ExitStatus] = []

    async def wait_for_child() -> None:
        statuses.append(await wait_for(child))

    # The first waiter watches the pidfd and is cancelled, so another must take over.
    first_scope = anyio.CancelScope()

    async def wait_then_cancel() -> None:
        with first_scope:
            await wait_for(child)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(wait_then_cancel)
        await anyio.sleep(0.1)
        for _ in range(20):
            task_group.start_soon(wait_for_child)
        await anyio.sleep(0.1)
        first_scope.cancel()
        await anyio.sleep(0.1)
        os.kill(child.pid, SIGKILL)

    assert first_scope.cancelled_caught
    assert len(statuses) == 20
    assert set(statuses) == {ExitStatus(code=None, signal=SIGKILL)}


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_adopt_rejects_wrong_start_time(spawn: Spawn) -> None:
    child = await spawn(["sleep", "300"])

    adopted = AdoptedProcess.adopt(child.pid, child.start_time + 10)

    assert adopted is None
    await stop_within(child, timeout_s=10)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_adopt_rejects_dead_pid(spawn: Spawn) -> None:
    child = await spawn(["true"])
    await wait_for(child)

    assert AdoptedProcess.adopt(child.pid, child.start_time) is None
    assert process_start_time(child.pid) is None


async def start_orphans(spawn: Spawn, tmp_path: Path, script: str, count: int) -> ChildProcess:
    """Run script under a reaper child, so the processes it starts are not our children."""
    reaper_path = tmp_path / "reaper.py"
    reaper_path.write_text(REAPER_SCRIPT)
    reaper = await spawn([PYTHON, str(reaper_path), "sh", "-c", script])
    await read_lines(tmp_path / "out.log", count)
    return reaper


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_adopted_exit_noticed_at_once(spawn: Spawn, tmp_path: Path) -> None:
    reaper = await start_orphans(spawn, tmp_path, "sleep 300 & echo $!", 1)
    orphan = int((tmp_path / "out.log").read_text())
    start_time = process_start_time(orphan)
    assert start_time is not None
    assert psutil.Process(orphan).ppid() != os.getpid()

    adopted = AdoptedProcess.adopt(orphan, start_time)
    assert adopted is not None
    started_at = time.perf_counter()
    os.kill(orphan, SIGKILL)
    with anyio.fail_after(1):
        status = await wait_for(adopted)
    print(f"adopted exit notice after SIGKILL: {(time.perf_counter() - started_at) * 1000:.3f} ms")

    assert status == ExitStatus.unknown()
    assert (await wait_for(reaper)).success


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_adopted_stop_ends_process(spawn: Spawn, tmp_path: Path) -> None:
    reaper = await start_orphans(spawn, tmp_path, "sleep 300 & echo $!", 1)
    orphan = int((tmp_path / "out.log").read_text())
    start_time = process_start_time(orphan)
    assert start_time is not None
    adopted = AdoptedProcess.adopt(orphan, start_time)
    assert adopted is not None

    status = await stop_within(adopted, timeout_s=10)

    assert status == ExitStatus.unknown()
    assert (await wait_for(reaper)).success
    assert not same_process(orphan, start_time)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_adopted_stop_kills_group(spawn: Spawn, tmp_path: Path) -> None:
    # setsid makes the orphaned shell lead its own group, as a spawned instance does.
    script = "setsid sh -c '(trap \"\" TERM; exec sleep 300) & echo $$; echo $!; wait' &"
    reaper = await start_orphans(spawn, tmp_path, script, 2)
    leader, grandchild = (int(line) for line in (tmp_path / "out.log").read_text().split())
    leader_start_time = process_start_time(leader)
    grandchild_start_time = process_start_time(grandchild)
    assert leader_start_time is not None
    assert grandchild_start_time is not None
    adopted = AdoptedProcess.adopt(leader, leader_start_time)
    assert adopted is not None
    assert adopted.pgid == leader

    status = await stop_within(adopted, timeout_s=10)

    assert status == ExitStatus.unknown()
    assert (await wait_for(reaper)).success
    assert not same_process(grandchild, grandchild_start_time)
