"""The run context that the harness gives a benchmark: its broker, sizes, rounds, folders and interpreter."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from bench.children import ChildProcess, spawn

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchContext:
    """The settings of one benchmark run.

    `broker_url` points at a virtual host that the harness created for this
    benchmark alone and deletes afterwards. `rounds_override` replaces every
    benchmark's own number of rounds when set.
    """

    broker_url: str
    quick: bool
    log_dir: Path
    rounds_override: int | None = None
    python: str = sys.executable
    repo: Path = REPO

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def rounds(self, full: int, quick: int) -> int:
        if self.rounds_override is not None:
            return self.rounds_override
        return quick if self.quick else full

    def role_argv(self, module: str, *args: str) -> list[str]:
        """Return the command line of a child role module of `bench.roles`."""
        return [self.python, "-m", f"bench.roles.{module}", *args]

    def spawn(
        self, argv: Sequence[str], *, label: str, env: Mapping[str, str] | None = None
    ) -> AbstractAsyncContextManager[ChildProcess]:
        """Start a child in the repository with its stderr in the log folder (see `bench.children.spawn`)."""
        return spawn(argv, label=label, log_dir=self.log_dir, cwd=self.repo, env=env)


def variant_order(round_index: int, variants: Sequence[str]) -> list[str]:
    """Rotate the variants by one place per round (A B, B A, A B, ...) so that drift hits each alike."""
    shift = round_index % len(variants)
    return [*variants[shift:], *variants[:shift]]


def unique_suffix() -> str:
    return os.urandom(4).hex()
