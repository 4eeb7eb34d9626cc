"""The cluster key that signs control commands.

It comes from `cluster_key` in supervisor.toml (or `MRQ_CLUSTER_KEY`), from
`cluster_key_file`, or from `<state_dir>/cluster.key`, which the supervisor
creates with mode 0600 at its first start and the CLI on the same host reads.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from loguru import logger

from supervisor.config import SupervisorSettings

KEY_FILE_NAME = "cluster.key"
MIN_KEY_LENGTH = 16


class KeyError_(Exception):
    """The cluster key is missing or unreadable; the message says where it was looked for."""


def key_file(settings: SupervisorSettings) -> Path:
    return settings.cluster_key_file or settings.state_dir / KEY_FILE_NAME


def _read(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise KeyError_(
            f"cannot read the cluster key file {path}: {exc.strerror}; check its permissions, "
            "or set cluster_key_file in [supervisor] to a readable file"
        ) from None
    except UnicodeDecodeError as exc:
        raise KeyError_(
            f"invalid cluster key file {path}: byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
            "is not UTF-8 text; write the cluster's key into it as text, or, if it is the "
            f"{KEY_FILE_NAME} of the state folder, delete it and the supervisor creates a new key"
        ) from None
    if len(text) < MIN_KEY_LENGTH:
        raise KeyError_(
            f"the cluster key in {path} is shorter than {MIN_KEY_LENGTH} characters; "
            "write a longer random key into it"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "cluster key file readable by others path={} mode={:o}; run chmod 600 on it", path, mode
        )
    return text.encode()


def load_or_create(settings: SupervisorSettings) -> bytes:
    """Return the key for a supervisor, creating the key file in the state folder when none exists."""
    if settings.cluster_key is not None:
        return settings.cluster_key.get_secret_value().encode()
    path = key_file(settings)
    if path.exists() or settings.cluster_key_file is not None:
        return _read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    logger.info("cluster key created path={}", path)
    return key.encode()


def load_for_client(settings: SupervisorSettings) -> bytes:
    """Return the key for the CLI; raise KeyError_ with the fix when there is none."""
    if settings.cluster_key is not None:
        return settings.cluster_key.get_secret_value().encode()
    path = key_file(settings)
    if not path.exists():
        raise KeyError_(
            f"no cluster key: {path} does not exist and neither cluster_key nor MRQ_CLUSTER_KEY is set; "
            "start the supervisor once on this host (it creates the file), or set MRQ_CLUSTER_KEY "
            "to the key of the cluster"
        )
    return _read(path)
