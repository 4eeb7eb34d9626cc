"""`python -m bench [NAME...]`: run benchmarks, print their markdown, optionally save JSON and BENCHMARKS.md.

`scripts/bench` runs this after setting up the virtual environment and the
broker. Exit codes: 0 when every benchmark ran, 1 when one failed (the
others still run), 2 for invalid arguments or a broker that cannot be used.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
from loguru import logger

from bench.broker import BenchVhost, BrokerSetupError, check_broker, remove_stale_vhosts, server_version
from bench.context import REPO, BenchContext
from bench.machine import describe, load_average
from bench.registry import BENCHMARKS, load
from bench.report import RunInfo, render_section, update_markdown
from bench.results import BenchResult

PROGRAM = "scripts/bench"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Benchmark mrq against raw aio-pika doing the same work, on the local RabbitMQ.",
    )

    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run, in the order given (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and one round: checks that the benchmarks work"
    )
    parser.add_argument(
        "--rounds", type=int, metavar="N", help="rounds of every benchmark (default: its own)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="replace the sections of the benchmarks run in FILE"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="folder for the children's stderr (default: a new folder in bench-output/, "
        "deleted when every benchmark succeeds)",
    )

    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known benchmarks: {', '.join(BENCHMARKS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.names = args.names or list(BENCHMARKS)
    return args


async def _run_one(
    name: str, args: argparse.Namespace, log_dir: Path, machine: dict[str, Any]
) -> tuple[BenchResult, RunInfo]:
    benchmark = load(name)
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_at_start = load_average()
    started_s = time.monotonic()
    logger.info("benchmark started name={} quick={} load_average={}", name, args.quick, load_at_start[0])
    vhost = await BenchVhost.create(name)
    try:
        context = BenchContext(
            broker_url=vhost.url, quick=args.quick, log_dir=log_dir, rounds_override=args.rounds
        )
        result = await benchmark(context)
    finally:
        await vhost.delete()
    run = RunInfo(
        command=shlex.join([PROGRAM, *args.argv]),
        started_at=started_at,
        duration_s=time.monotonic() - started_s,
        machine=machine,
        load_average=load_at_start,
        quick=args.quick,
    )
    logger.info("benchmark finished name={} duration_s={:.1f}", name, run.duration_s)
    return result, run


def _write_json(path: Path, done: list[tuple[BenchResult, RunInfo]], failed: list[str]) -> None:
    document = {
        "results": [{**result.to_dict(), "run": run.to_dict()} for result, run in done],
        "failed": failed,
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


async def run_all(args: argparse.Namespace) -> int:
    """Run the chosen benchmarks one after another, each in a virtual host of its own."""
    try:
        await check_broker()
        await remove_stale_vhosts()
        machine = describe(await server_version())
    except BrokerSetupError as exc:
        logger.error("broker setup failed error={}", exc)
        return 2
    log_dir = args.log_dir or REPO / "bench-output" / datetime.now(UTC).strftime("logs-%Y%m%dT%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    done: list[tuple[BenchResult, RunInfo]] = []
    failed: list[str] = []
    for name in args.names:
        try:
            done.append(await _run_one(name, args, log_dir, machine))
        except Exception:
            logger.exception("benchmark failed name={} logs={}", name, log_dir)
            failed.append(name)
    sections = {result.name: render_section(result, run) for result, run in done}
    sys.stdout.write("\n".join(sections.values()))
    if args.json is not None:
        _write_json(args.json, done, failed)
    if args.markdown is not None and sections:
        update_markdown(args.markdown, sections)
    if failed:
        return 1
    if args.log_dir is None:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    args.argv = arguments
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="{time:HH:mm:ss} {level: <7} {message}", colorize=False)
    exit_code: int = anyio.run(run_all, args, backend="asyncio", backend_options={"use_uvloop": True})
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
