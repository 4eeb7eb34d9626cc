"""Start-up of a worker: settings, logging, uvloop, the target module, exit codes.

Exit codes: 0 after a clean stop, 78 (EX_CONFIG) when the target or the
settings are wrong (a restart cannot help), 1 when it fails while running or
when importing the target raised any other error (a restart may help).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
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


class ImportFailure(Exception):
    """Importing the target raised an error that a restart may cure; the message is the one-line reason."""


# Errors of the target's import that mean the code or the configuration is wrong. Anything
# else (a database not reachable yet, say) may pass, so the supervisor restarts the worker.
_CONFIGURATION_ERRORS = (ImportError, SyntaxError, DefinitionError, SettingsError)


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
    except _CONFIGURATION_ERRORS as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise ImportFailure(f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        specs = registry.specs(resolved.service_name)
    except DefinitionError as exc:
        raise ConfigurationError(f"invalid service definition in {module_name!r}: {exc}") from exc
    # A module that imports another service's module (for its models, say) must not
    # serve that service too: prefer what the target itself defines.
    own = [spec for spec in specs if _defined_in(spec, module_name)]
    specs = own or specs
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


def _defined_in(spec: ServiceSpec, module_name: str) -> bool:
    """Say whether a service is defined in `module_name` or one of its submodules."""
    if spec.cls is not None:
        modules = {spec.cls.__module__}
    else:
        modules = {getattr(route.func, "__module__", "") for route in spec.routes}
    return any(m == module_name or m.startswith(module_name + ".") for m in modules)


def fail_configuration(message: str, exc: BaseException | None) -> None:
    _fail(f"{message} (exit {names.EXIT_CONFIG}, configuration error)", exc, names.EXIT_CONFIG)


def _fail(line: str, exc: BaseException | None, code: int) -> None:
    sys.stderr.write(f"worker: {line}\n")
    if exc is not None and exc.__cause__ is not None:
        traceback.print_exception(exc.__cause__, file=sys.stderr)
    sys.stderr.flush()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    # An ignored signal survives exec; a worker must stop on SIGTERM and SIGINT whatever its parent ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
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
    except ImportFailure as exc:
        _fail(f"{exc} (exit 1, a restart may help)", exc, 1)
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
    except Exception as exc:
        error = _single_error(exc)
        if isinstance(error, DefinitionError):
            logger.opt(exception=error).error("invalid service definition: {}", error)
            return names.EXIT_CONFIG
        logger.opt(exception=error).error("worker failed: {}: {}", type(error).__name__, error)
        return 1
    return 0


def _single_error(exc: BaseException) -> BaseException:
    """Return the only error inside (nested) exception groups, or `exc` when there are several."""
    # ServiceHost.start() raises a failure of start-up wrapped in the ExceptionGroup of its task group.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
