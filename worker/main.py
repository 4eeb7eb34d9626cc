"""Start-up of a worker: settings, logging, uvloop, the target module, exit codes.

Exit codes: 0 after a clean stop, 78 (EX_CONFIG) when the target or the
settings are wrong (a restart cannot help), 1 when it fails while running.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from sdk import names
from sdk.errors import DefinitionError, SettingsError
from sdk.service import ServiceSpec, registry
from sdk.settings import SettingsModel, settings

TARGET_VARIABLE = "MRQ_TARGET"


class ConfigurationError(Exception):
    """The worker cannot start as configured; the message is the one-line reason."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Run the services of a module as one supervised instance.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_VARIABLE),
        help=f"MODULE or MODULE:NAME to serve (default: ${TARGET_VARIABLE}); NAME picks one service",
    )
    args = parser.parse_args(argv)
    if not args.target:
        parser.error(f"no target: pass --target MODULE[:NAME] or set {TARGET_VARIABLE}")
    return args


def load_target(target: str, resolved: SettingsModel) -> list[ServiceSpec]:
    """Import the target module and return the services it registered (or the one named)."""
    module_name, _, wanted = target.partition(":")
    try:
        importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        specs = registry.specs(resolved.service_name)
    except DefinitionError as exc:
        raise ConfigurationError(f"invalid service definition in {module_name!r}: {exc}") from exc
    if wanted:
        specs = [s for s in specs if wanted in (s.name, s.cls.__name__ if s.cls else None)]
        if not specs:
            raise ConfigurationError(f"module {module_name!r} defines no service named {wanted!r}")
    if not specs:
        raise ConfigurationError(
            f"module {module_name!r} defines no service: subclass sdk.Service with a name, "
            "or decorate a function with @microservice"
        )
    return specs


def fail_configuration(message: str, exc: BaseException | None) -> None:
    sys.stderr.write(f"worker: {message} (exit {names.EXIT_CONFIG}, configuration error)\n")
    if exc is not None and exc.__cause__ is not None:
        traceback.print_exception(exc.__cause__, file=sys.stderr)
    sys.stderr.flush()
    sys.exit(names.EXIT_CONFIG)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        resolved = settings.resolve()
    except SettingsError as exc:
        fail_configuration(f"invalid settings: {exc}", None)
        return
    try:
        specs = load_target(args.target, resolved)
    except ConfigurationError as exc:
        fail_configuration(str(exc), exc)
        return
    from worker import logs

    identity = resolved.service_name or specs[0].name
    logs.configure(resolved.log_level, resolved.log_format, service=identity, instance=resolved.instance)
    sys.exit(_serve(specs, resolved))


def _serve(specs: list[ServiceSpec], resolved: SettingsModel) -> int:
    import uvloop
    from loguru import logger

    from worker.agent import Worker

    try:
        worker = Worker(specs, resolved)
        uvloop.run(worker.run())
    except DefinitionError as exc:
        logger.opt(exception=exc).error("invalid service definition: {}", exc)
        return names.EXIT_CONFIG
    except Exception as exc:
        logger.opt(exception=exc).error("worker failed: {}: {}", type(exc).__name__, exc)
        return 1
    return 0
