"""Instance log files: their paths, copytruncate rotation, tail and follow.

The supervisor opens each instance's log file with O_APPEND and passes the descriptor to
the child as its stdout and stderr, with no pipe in between. Rotation therefore copies the
file and truncates it in place ("copytruncate") instead of renaming it: the child keeps
its descriptor, and O_APPEND makes its next write land at the new end of the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

__all__ = [
    "LOGS_DIR_NAME",
    "LOG_FILE_MODE",
    "backup_path",
    "follow",
    "instance_log_path",
    "open_for_append",
    "rotate_if_needed",
    "tail",
]

LOGS_DIR_NAME: Final = "logs"
LOG_FILE_MODE: Final = 0o644

_COPY_CHUNK_BYTES: Final = 1024 * 1024
# Rotation truncates once the uncopied rest is at most this size, so the final read
# before the truncate is short.
_FINAL_TAIL_BYTES: Final = 64 * 1024
_MAX_COPY_PASSES: Final = 16
_TAIL_BLOCK_BYTES: Final = 64 * 1024
_FOLLOW_READ_BYTES: Final = 1024 * 1024


def instance_log_path(state_dir: Path, service: str, index: int) -> Path:
    """Return `<state_dir>/logs/<service>.<index>.log`.

    Raises ValueError for a service name that is empty, starts with a dot or contains a
    path separator or NUL, and for a negative index.
    """
    if not service or service.startswith(".") or any(c in service for c in ("/", "\\", "\0")):
        raise ValueError(
            f"invalid service name {service!r} for a log file name: expected a non-empty "
            f"name without '/', '\\' or NUL that does not start with '.'"
        )
    if index < 0:
        raise ValueError(f"invalid instance index {index} of service {service!r}: expected 0 or more")
    return state_dir / LOGS_DIR_NAME / f"{service}.{index}.log"


def backup_path(path: Path, number: int) -> Path:
    """Return the path of backup `<path>.<number>`, where 1 is the newest."""
    return path.with_name(f"{path.name}.{number}")


def open_for_append(path: Path) -> int:
    """Open or create a log file for a child's stdout and stderr, and return the descriptor.

    Creates the parent folder if missing. The descriptor has O_APPEND, so writes after a
    copytruncate rotation start at the new end instead of leaving a hole of zero bytes.
    It is not inheritable, but passing it as a child's stdout and stderr duplicates it
    onto descriptors 1 and 2, which the child inherits. The caller closes it afterwards.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, LOG_FILE_MODE)


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate the file by copytruncate if it is larger than max_bytes, and return whether it did.

    Shifts `<path>.1` .. `<path>.<backups - 1>` up by one, dropping `<path>.<backups>`,
    copies the file to `<path>.1` and truncates it to zero bytes. With backups=0 it only
    truncates. Blocks on file I/O, so run it in a worker thread. A missing file is not
    rotated.
    """
    if max_bytes < 0 or backups < 0:
        raise ValueError(
            f"invalid rotation limits max_bytes={max_bytes} backups={backups}: expected 0 or more"
        )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False

    if backups > 0:
        _shift_backups(path, backups)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if backups > 0:
            _copy_then_truncate(fd, backup_path(path, 1))
        else:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return True


def _shift_backups(path: Path, backups: int) -> None:
    for number in range(backups - 1, 0, -1):
        # os.replace overwrites the older backup, which drops the oldest one.
        with contextlib.suppress(FileNotFoundError):
            os.replace(backup_path(path, number), backup_path(path, number + 1))


def _copy_then_truncate(fd: int, backup: Path) -> None:
    """Copy the file behind fd to backup, then truncate it, leaving the shortest gap."""
    with backup.open("wb") as out:
        for _ in range(_MAX_COPY_PASSES):
            _copy_to_end(fd, out.fileno())
            if os.fstat(fd).st_size - os.lseek(fd, 0, os.SEEK_CUR) <= _FINAL_TAIL_BYTES:
                break

        # NOTE: lines that the child writes between this last read and the truncate are
        # lost, and a line whose write was in progress during the read can end up cut in
        # the backup. The passes above keep this read short (at most _FINAL_TAIL_BYTES
        # unless the child outwrites every pass), so the gap is short, but it is not zero.
        rest = _read_to_end(fd)
        os.ftruncate(fd, 0)
        _write_all(out.fileno(), rest)


def _copy_to_end(src: int, dst: int) -> None:
    while chunk := os.read(src, _COPY_CHUNK_BYTES):
        _write_all(dst, chunk)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, _COPY_CHUNK_BYTES):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def tail(path: Path, lines: int) -> list[str]:
    """Return the last `lines` lines of the file, without line endings, oldest first.

    When the file has fewer lines, the rest comes from the end of `<path>.1`. A missing file
    counts as empty. The last line is returned even if it has no newline yet. Bytes that are
    not UTF-8 are replaced with U+FFFD.
    """
    if lines < 0:
        raise ValueError(f"invalid line count {lines}: expected 0 or more")
    return await anyio.to_thread.run_sync(_tail_with_backup, path, lines)


def _tail_with_backup(path: Path, lines: int) -> list[str]:
    newest = _tail_file(path, lines)
    if len(newest) >= lines:
        return newest
    return _tail_file(backup_path(path, 1), lines - len(newest)) + newest


def _tail_file(path: Path, lines: int) -> list[str]:
    if lines == 0:
        return []
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return []
    with file:
        position = file.seek(0, os.SEEK_END)
        blocks: list[bytes] = []
        newlines = 0
        # lines + 1 newlines guarantee that the first of the last `lines` lines is complete.
        while position > 0 and newlines <= lines:
            step = min(_TAIL_BLOCK_BYTES, position)
            position -= step
            file.seek(position)
            block = file.read(step)
            blocks.append(block)
            newlines += block.count(b"\n")

    parts = b"".join(reversed(blocks)).split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    if position > 0:
        parts.pop(0)
    return [part.decode("utf-8", errors="replace") for part in parts[-lines:]]


@dataclass(frozen=True, slots=True)
class _Chunk:
    data: bytes
    position: int
    inode: int | None
    restarted: bool


def _read_new(path: Path, position: int, inode: int | None) -> _Chunk:
    """Read what was appended after position, starting over if the file was rotated."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return _Chunk(b"", 0, None, restarted=position > 0)
    with file:
        stat = os.fstat(file.fileno())
        restarted = stat.st_size < position or (inode is not None and stat.st_ino != inode)
        if restarted:
            position = 0
        file.seek(position)
        data = file.read(_FOLLOW_READ_BYTES)
    return _Chunk(data, position + len(data), stat.st_ino, restarted)


async def follow(
    path: Path, *, from_end: bool = True, poll_interval_s: float = 0.2
) -> AsyncGenerator[str, None]:
    """Yield lines as they are appended to the file, without line endings, forever.

    Starts at the current end (from_end=True) or at the start. A missing file is waited
    for. When the file shrinks (copytruncate rotation) or is replaced by another file,
    reading starts over from its beginning. A partial line is held until its newline
    arrives; one still held when the file is rotated is yielded as it is. Close the
    generator with `contextlib.aclosing` or `aclose()` when done with it.

    The file size is polled every poll_interval_s, which is simple and portable; inotify
    would react sooner. NOTE: a rotation followed by growth past the old read position
    within one poll interval is not detected, and the lines in between are skipped.
    """
    if poll_interval_s <= 0:
        raise ValueError(f"invalid poll_interval_s {poll_interval_s}: expected more than 0")
    position, inode = await anyio.to_thread.run_sync(_start_position, path, from_end)
    pending = b""
    while True:
        chunk = await anyio.to_thread.run_sync(_read_new, path, position, inode)
        position, inode = chunk.position, chunk.inode
        if chunk.restarted and pending:
            yield pending.decode("utf-8", errors="replace")
            pending = b""
        if not chunk.data:
            await anyio.sleep(poll_interval_s)
            continue

        *complete, pending = (pending + chunk.data).split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")


def _start_position(path: Path, from_end: bool) -> tuple[int, int | None]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0, None
    return (stat.st_size if from_end else 0), stat.st_ino
