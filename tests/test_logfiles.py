"""Tests of instance log files: rotation with a real writing child, tail and follow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.logfiles import (
    backup_path,
    follow,
    instance_log_path,
    open_for_append,
    rotate_if_needed,
    tail,
)

# Writes the numbers 0 .. N-1, one line per write() call, about one line per millisecond.
NUMBERED_LINES_CHILD = """
import os, sys, time
for n in range(int(sys.argv[1])):
    os.write(1, b"%d\\n" % n)
    time.sleep(0.001)
"""

FAST_POLL_S = 0.02


def append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


def test_instance_log_path_layout(tmp_path: Path) -> None:
    path = instance_log_path(tmp_path, "orders", 3)
    assert path == tmp_path / "logs" / "orders.3.log"


@pytest.mark.parametrize("service", ["", ".hidden", "a/b", "a\\b", "a\0b"])
def test_instance_log_path_rejects_bad_name(tmp_path: Path, service: str) -> None:
    with pytest.raises(ValueError, match="invalid service name"):
        instance_log_path(tmp_path, service, 0)


def test_instance_log_path_rejects_negative_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid instance index -1 of service 'orders'"):
        instance_log_path(tmp_path, "orders", -1)


def test_rotate_under_limit_does_nothing(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "x" * 99 + "\n")
    assert rotate_if_needed(path, 100, 3) is False
    assert path.stat().st_size == 100
    assert not backup_path(path, 1).exists()


def test_rotate_missing_file_does_nothing(tmp_path: Path) -> None:
    assert rotate_if_needed(tmp_path / "absent.log", 0, 3) is False


def test_rotate_keeps_backup_count(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    for generation in range(6):
        append(path, f"generation {generation}\n" * 20)
        assert rotate_if_needed(path, 100, 3) is True

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["svc.0.log", "svc.0.log.1", "svc.0.log.2", "svc.0.log.3"]
    assert path.stat().st_size == 0
    assert backup_path(path, 1).read_text() == "generation 5\n" * 20
    assert backup_path(path, 2).read_text() == "generation 4\n" * 20
    assert backup_path(path, 3).read_text() == "generation 3\n" * 20


def test_rotate_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "line\n" * 100)
    assert rotate_if_needed(path, 10, 0) is True
    assert path.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.0.log"]


def test_rotate_copies_large_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    content = b"".join(b"%08d some log text\n" % n for n in range(150_000))
    path.write_bytes(content)
    assert len(content) > 3 * 1024 * 1024

    assert rotate_if_needed(path, 1024, 2) is True
    assert backup_path(path, 1).read_bytes() == content
    assert path.stat().st_size == 0


def read_numbers(paths: list[Path]) -> tuple[list[int], int]:
    """Return the numbers of the complete lines in the files, and the count of cut lines.

    A backup can end with a line cut by the truncate, which has no newline.
    """
    numbers: list[int] = []
    cut_lines = 0
    for path in paths:
        *complete, last = path.read_bytes().split(b"\n")
        numbers.extend(int(line) for line in complete)
        cut_lines += last != b""
    return numbers, cut_lines


@pytest.mark.timeout(90)
def test_rotate_while_child_appends(tmp_path: Path) -> None:
    total_lines = 3000
    backups = 200
    path = instance_log_path(tmp_path, "writer", 0)
    fd = open_for_append(path)
    inode = os.fstat(fd).st_ino
    child = subprocess.Popen(
        [sys.executable, "-c", NUMBERED_LINES_CHILD, str(total_lines)],
        stdout=fd,
        stderr=subprocess.PIPE,
    )
    os.close(fd)

    rotations = 0
    while child.poll() is None:
        time.sleep(0.05)
        rotations += rotate_if_needed(path, 500, backups)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, stderr.decode()

    files = [backup_path(path, n) for n in range(backups, 0, -1)] + [path]
    files = [f for f in files if f.exists()]
    numbers, cut_lines = read_numbers(files)
    lost = total_lines - len(numbers)
    print(f"rotations={rotations} lines_written={total_lines} lines_lost={lost} cut={cut_lines}")

    assert rotations >= 3
    assert len(files) == rotations + 1
    assert path.stat().st_ino == inode
    assert all(b"\0" not in f.read_bytes() for f in files), "a hole means no O_APPEND"
    assert numbers == sorted(set(numbers)), "every line appears once, in order"
    assert lost <= total_lines // 100


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_tail_returns_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    # Lines of varied length cross the 64 KiB read blocks at different offsets.
    expected = [f"{n} " + "x" * (n % 97) for n in range(20_000)]
    append(path, "\n".join(expected) + "\n")

    assert await tail(path, 1) == expected[-1:]
    assert await tail(path, 5000) == expected[-5000:]
    assert await tail(path, 0) == []
    assert await tail(path, 50_000) == expected


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_tail_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    # Lines as long as a 64 KiB read block, and around it, put newlines at block edges.
    lengths = [65535, 65536, 65537, 131071, 65535, 65535, 10, 65535]
    expected = [chr(ord("a") + n) * length for n, length in enumerate(lengths)]
    append(path, "\n".join(expected) + "\n")

    for count in range(1, len(expected) + 1):
        assert await tail(path, count) == expected[-count:], f"last {count} lines"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_tail_keeps_unterminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "one\ntwo\nthree")
    assert await tail(path, 2) == ["two", "three"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_tail_missing_file_is_empty(tmp_path: Path) -> None:
    assert await tail(tmp_path / "absent.log", 10) == []


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_tail_reads_into_backup(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "".join(f"old {n}\n" for n in range(10)))
    assert rotate_if_needed(path, 0, 2) is True
    append(path, "".join(f"new {n}\n" for n in range(3)))

    assert await tail(path, 5) == ["old 8", "old 9", "new 0", "new 1", "new 2"]
    assert await tail(path, 2) == ["new 1", "new 2"]


class Collector:
    """Runs follow() in a task and stores the lines it yields."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.path = path
        self.options = options
        self.lines: list[str] = []
        self._appended = anyio.Event()

    async def run(self) -> None:
        lines = follow(self.path, poll_interval_s=FAST_POLL_S, **self.options)
        async with aclosing(lines):
            async for line in lines:
                self.lines.append(line)
                self._appended.set()
                self._appended = anyio.Event()

    async def wait_for_count(self, count: int, timeout_s: float = 20.0) -> None:
        with anyio.fail_after(timeout_s):
            while len(self.lines) < count:
                await self._appended.wait()

    async def wait_until_following(self) -> list[str]:
        """Append probe lines until follow() yields one, then return and clear the lines so far."""
        with anyio.fail_after(20.0):
            while not self.lines:
                append(self.path, "probe\n")
                await anyio.sleep(0.05)
        await anyio.sleep(3 * FAST_POLL_S)
        seen = list(self.lines)
        self.lines.clear()
        return seen


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_yields_new_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "old 1\nold 2\n")
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        assert set(await collector.wait_until_following()) == {"probe"}

        append(path, "new 1\nnew 2\n")
        await collector.wait_for_count(2)
        group.cancel_scope.cancel()

    assert collector.lines == ["new 1", "new 2"]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_from_start_reads_existing(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "old 1\nold 2\n")
    collector = Collector(path, from_end=False)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await collector.wait_for_count(2)
        append(path, "new 1\n")
        await collector.wait_for_count(3)
        group.cancel_scope.cancel()

    assert collector.lines == ["old 1", "old 2", "new 1"]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_waits_for_file_creation(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await anyio.sleep(10 * FAST_POLL_S)
        append(path, "first\nsecond\n")
        await collector.wait_for_count(2)
        group.cancel_scope.cancel()

    assert collector.lines == ["first", "second"]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "old\n")
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await collector.wait_until_following()

        before = [f"before rotation {n}" for n in range(10)]
        append(path, "".join(f"{line}\n" for line in before))
        await collector.wait_for_count(10)
        assert rotate_if_needed(path, 0, 1) is True
        after = ["a1", "a2", "a3"]
        append(path, "".join(f"{line}\n" for line in after))
        await collector.wait_for_count(13)
        group.cancel_scope.cancel()

    assert collector.lines == before + after


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_holds_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "")
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await collector.wait_until_following()

        append(path, "abc")
        await anyio.sleep(10 * FAST_POLL_S)
        assert collector.lines == []
        append(path, "def\nghi\n")
        await collector.wait_for_count(2)
        group.cancel_scope.cancel()

    assert collector.lines == ["abcdef", "ghi"]


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_restarts_on_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "old\n")
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await collector.wait_until_following()

        # The new file is longer than the read position, so only its inode number reveals the replacement.
        replacement = tmp_path / "new.log"
        lines = [f"replacement line {n}" for n in range(5)]
        append(replacement, "".join(f"{line}\n" for line in lines))
        replacement.replace(path)
        await collector.wait_for_count(5)
        group.cancel_scope.cancel()

    assert collector.lines == lines


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_follow_yields_partial_line_on_rotation(tmp_path: Path) -> None:
    path = tmp_path / "svc.0.log"
    append(path, "")
    collector = Collector(path)
    async with anyio.create_task_group() as group:
        group.start_soon(collector.run)
        await collector.wait_until_following()

        append(path, "cut")
        await anyio.sleep(10 * FAST_POLL_S)
        assert rotate_if_needed(path, 0, 1) is True
        await collector.wait_for_count(1)
        append(path, "next\n")
        await collector.wait_for_count(2)
        group.cancel_scope.cancel()

    assert collector.lines == ["cut", "next"]
