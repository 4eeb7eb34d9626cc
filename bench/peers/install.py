"""Installs of the peer supervisors and of py-spy into bench/.peers/, made by the benchmark itself.

supervisord, circus and py-spy get a virtual environment each, from PyPI;
PM2 is installed with npm into a folder of its own. Versions are pinned, and
an install is redone only when its pin changes. The folder contains a
`.gitignore` that makes git ignore everything in it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
from loguru import logger

from bench.context import REPO

PEERS_DIR = REPO / "bench" / ".peers"
SUPERVISOR_REQUIREMENT = "supervisor==4.3.0"
CIRCUS_REQUIREMENT = "circus==0.19.0"
PY_SPY_REQUIREMENT = "py-spy==0.4.3"
PM2_PACKAGE = "pm2@7.0.4"
INSTALL_TIMEOUT_S = 600.0
_STAMP = ".installed"


class PeerInstallError(Exception):
    """A peer supervisor or py-spy could not be installed."""


@dataclass(frozen=True)
class PeerTools:
    """Paths of the installed programs."""

    supervisord: Path
    circusd: Path
    pm2: Path
    py_spy: Path


async def _run(argv: list[str], what: str) -> None:
    try:
        with anyio.fail_after(INSTALL_TIMEOUT_S):
            result = await anyio.run_process(argv, check=False)
    except TimeoutError as exc:
        raise PeerInstallError(f"installing {what} timed out after {INSTALL_TIMEOUT_S:g} s: {argv}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        raise PeerInstallError(
            f"installing {what} failed with exit code {result.returncode}; "
            f"check that PyPI and the npm registry are reachable. Output:\n{output}"
        )


def _installed(folder: Path, pin: str) -> bool:
    stamp = folder / _STAMP
    return stamp.exists() and stamp.read_text() == pin


async def _ensure_venv(name: str, requirement: str) -> Path:
    folder = PEERS_DIR / name
    if _installed(folder, requirement):
        return folder
    logger.info("peer install started name={} requirement={}", name, requirement)
    shutil.rmtree(folder, ignore_errors=True)
    await _run([sys.executable, "-m", "venv", str(folder)], requirement)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    await _run([*pip, requirement], requirement)
    (folder / _STAMP).write_text(requirement)
    return folder


async def _ensure_pm2() -> Path:
    folder = PEERS_DIR / "pm2"
    if not _installed(folder, PM2_PACKAGE):
        npm = shutil.which("npm")
        if npm is None:
            raise PeerInstallError("npm not found on PATH; install Node.js and npm (apt-get install npm)")
        logger.info("peer install started name=pm2 package={}", PM2_PACKAGE)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        await _run(
            [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", PM2_PACKAGE], PM2_PACKAGE
        )
        (folder / _STAMP).write_text(PM2_PACKAGE)
    return folder / "node_modules" / ".bin" / "pm2"


async def ensure_peers() -> PeerTools:
    """Install whatever is missing or outdated, and return the paths of the programs."""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    (PEERS_DIR / ".gitignore").write_text("*\n")
    supervisor_venv = await _ensure_venv("supervisord", SUPERVISOR_REQUIREMENT)
    circus_venv = await _ensure_venv("circus", CIRCUS_REQUIREMENT)
    py_spy_venv = await _ensure_venv("py-spy", PY_SPY_REQUIREMENT)
    pm2 = await _ensure_pm2()
    return PeerTools(
        supervisord=supervisor_venv / "bin" / "supervisord",
        circusd=circus_venv / "bin" / "circusd",
        pm2=pm2,
        py_spy=py_spy_venv / "bin" / "py-spy",
    )
