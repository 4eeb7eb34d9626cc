"""Loading and validation of supervisor.toml, the supervisor's configuration file.

`load_config` reads the file, `parse_config` validates TOML text. Both apply the
`MRQ_*` environment overrides and raise `ConfigError`, which lists every problem
found in the file, one per line, each with its key path, the expected form, the
value found and a fix.
"""

import contextlib
import difflib
import hashlib
import json
import keyword
import os
import re
import shlex
import shutil
import socket
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from ipaddress import IPv6Address
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticUndefined

__all__ = [
    "BROKER_AUTO",
    "CONTROL_EXCHANGE_SUFFIX",
    "DASHBOARD_DEFAULT",
    "DEFAULT_CONFIG_FILE",
    "ENV_OVERRIDES",
    "ConfigError",
    "ConfigProblem",
    "LogFormat",
    "LogLevel",
    "QueueType",
    "RestartPolicy",
    "ServiceConfig",
    "ServiceKind",
    "SupervisorConfig",
    "SupervisorSettings",
    "default_node_name",
    "load_config",
    "load_supervisor_settings",
    "parse_config",
    "redact_url",
]

DEFAULT_CONFIG_FILE: Final = "supervisor.toml"
BROKER_AUTO: Final = "auto"
DASHBOARD_DEFAULT: Final = "127.0.0.1:7070"
CONTROL_EXCHANGE_SUFFIX: Final = ".control"

# Environment variables that override keys of [supervisor], applied after the file.
ENV_OVERRIDES: Final[Mapping[str, str]] = {
    "MRQ_NODE": "node",
    "MRQ_BROKER_URL": "broker",
    "MRQ_EXCHANGE": "exchange",
    "MRQ_STATE_DIR": "state_dir",
    "MRQ_CLUSTER_KEY": "cluster_key",
    "MRQ_DASHBOARD": "dashboard",
}

NODE_NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SERVICE_NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# "all" addresses every node in control commands, so no single node may be called that.
RESERVED_NODE_NAMES: Final = frozenset({"all"})

# AMQP 0-9-1 specification, domain exchange-name: at most 127 characters of
# [a-zA-Z0-9-_.:]. The control exchange appends CONTROL_EXCHANGE_SUFFIX to the name.
EXCHANGE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]+")
EXCHANGE_NAME_MAX_LENGTH: Final = 127 - len(CONTROL_EXCHANGE_SUFFIX)
CLUSTER_KEY_MIN_LENGTH: Final = 16

RestartPolicy = Literal["always", "on-failure", "never"]
QueueType = Literal["classic", "quorum"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
ServiceKind = Literal["python", "program"]

_BACKOFF_INITIAL_DEFAULT_S: Final = 0.5
_BACKOFF_MAX_DEFAULT_S: Final = 30.0
_CONFIG_DIR_CONTEXT_KEY: Final = "config_dir"
_MASK: Final = "***"
_FOUND_MAX_CHARS: Final = 80


# --- errors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file.

    `key` is the dotted key path (`services.orders.replicas`), empty for the whole
    file. `line` and `column` are 1-based and set only for TOML syntax and UTF-8 errors.
    """

    key: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, path: Path) -> str:
        """Render the problem as `FILE[:LINE:COLUMN]: KEY: MESSAGE`."""
        location = str(path)
        if self.line is not None:
            location = f"{location}:{self.line}:{self.column}"
        if self.key:
            return f"{location}: {self.key}: {self.message}"
        return f"{location}: {self.message}"


class ConfigError(Exception):
    """A configuration file that is missing, unreadable or invalid.

    The message has one line per problem (a TOML syntax problem adds the source
    line and a caret). The cluster key and the broker password never appear in it.
    """

    def __init__(self, path: Path, problems: Sequence[ConfigProblem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        super().__init__("\n".join(problem.format(path) for problem in self.problems))


class _InvalidValue(ValueError):
    """A value rejected by a validator of this module, carried inside pydantic errors."""

    def __init__(
        self,
        expected: str,
        found: str,
        fix: str = "",
        *,
        suggestion: str | None = None,
        summary: str = "invalid value",
    ) -> None:
        super().__init__(f"{summary}: expected {expected}, found {found}")
        self.expected = expected
        self.found = found
        self.fix = fix
        self.suggestion = suggestion
        self.summary = summary


def _problem_text(summary: str, expected: str, found: str, fix: str) -> str:
    text = f"{summary}: expected {expected}, found {found}."
    return f"{text} {fix}" if fix else text


# --- rendering of values -----------------------------------------------------------------


def _toml_literal(value: Any) -> str:
    """Render a value as TOML source, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Path):
        return _quote(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = (f"{_toml_key(str(k))} = {_toml_literal(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    return repr(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _quote(key)


def _quote(text: str) -> str:
    """Quote a string as a TOML basic string, escaping every non-printable character.

    Escaping keeps characters such as U+0085 or U+2028 from breaking a message into lines.
    """
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(char if char.isprintable() else _escape(char) for char in quoted)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, datetime | date | time):
        return "a date or time"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _describe_found(value: Any) -> str:
    """Describe a value for the `found ...` part of a message: `"two" (a string)`."""
    if isinstance(value, Mapping):
        return "a table"
    literal = _toml_literal(value)
    if len(literal) > _FOUND_MAX_CHARS:
        literal = literal[: _FOUND_MAX_CHARS - 3] + "..."
    return f"{literal} ({_toml_type(value)})"


def _describe_secret(value: Any) -> str:
    if isinstance(value, str):
        count = len(value)
        return f"a hidden string of {count} character{'' if count == 1 else 's'}"
    return f"a hidden value ({_toml_type(value)})"


def redact_url(url: str) -> str:
    """Return the URL with its password replaced by `***`, for logs, reprs and messages.

    Everything between the user name and the last `@` is masked, so a password
    that is not percent-encoded is masked too.
    """
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*):.*@", rf"\1:{_MASK}@", url)


def _did_you_mean(value: str, choices: Sequence[str]) -> str | None:
    lowered = {choice.lower(): choice for choice in choices}
    if value.lower() in lowered:
        return lowered[value.lower()]
    matches = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


# --- value validators --------------------------------------------------------------------


def default_node_name() -> str:
    """Return the first label of the host name, lower-cased: the default node name."""
    return socket.gethostname().split(".", 1)[0].lower()


def _config_dir(info: ValidationInfo) -> Path:
    """Return the folder that relative paths start from: the config file's folder.

    Models built without a validation context (in code, not from a file) use the
    current directory.
    """
    context = info.context if isinstance(info.context, Mapping) else {}
    config_dir = context.get(_CONFIG_DIR_CONTEXT_KEY)
    return config_dir if isinstance(config_dir, Path) else Path.cwd()


def _require_string(value: Any, expected: str, fix: str) -> str:
    if not isinstance(value, str):
        raise _InvalidValue(expected, _describe_found(value), fix)
    return value


def _check_node_name(value: Any) -> str:
    expected = 'a node name of 1 to 63 characters from a-z, 0-9, "_" and "-" (not "all")'
    fix = 'Set node = "web-1" in [supervisor] or the environment variable MRQ_NODE.'
    name = _require_string(value, expected, fix)
    if name in RESERVED_NODE_NAMES:
        reason = f'"{name}" is reserved because control commands use it to address every node'
        raise _InvalidValue(expected, f'"{name}"', f"{reason}. {fix}")
    if not NODE_NAME_PATTERN.fullmatch(name):
        candidate = re.sub(r"[^a-z0-9_-]", "-", name.lower()).strip("-_")[:63]
        if NODE_NAME_PATTERN.fullmatch(candidate) and candidate not in RESERVED_NODE_NAMES:
            fix = f'Use node = "{candidate}" in [supervisor] or MRQ_NODE={candidate}.'
        raise _InvalidValue(expected, _describe_found(name), fix)
    return name


def _check_broker(value: Any) -> str:
    expected = '"auto" or an AMQP URL that starts with amqp:// or amqps://'
    fix = 'Write broker = "auto" or broker = "amqp://guest:guest@127.0.0.1:5672/".'
    url = _require_string(value, expected, fix)
    if url == BROKER_AUTO:
        return url

    found = _describe_found(redact_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _InvalidValue(expected, f"{found}, which is not a valid URL", fix) from exc
    if parts.scheme not in ("amqp", "amqps"):
        raise _InvalidValue(expected, f"{found} with scheme {parts.scheme or 'none'}", fix)
    if not parts.hostname:
        raise _InvalidValue(expected, f"{found} with no host", fix)
    if port == 0:
        raise _InvalidValue(expected, f"{found} with port 0", fix)
    return url


def _check_exchange(value: Any) -> str:
    expected = (
        f"an exchange name of 1 to {EXCHANGE_NAME_MAX_LENGTH} characters from"
        ' A-Z, a-z, 0-9, "_", "-", "." and ":" that does not start with "amq."'
    )
    fix = 'Write for example exchange = "mrq" (the default), or remove the line.'
    name = _require_string(value, expected, fix)
    valid = (
        EXCHANGE_NAME_PATTERN.fullmatch(name) is not None
        and len(name) <= EXCHANGE_NAME_MAX_LENGTH
        and not name.startswith("amq.")
    )
    if not valid:
        raise _InvalidValue(expected, _describe_found(name), fix)
    return name


def _resolve_path(value: Any, base_dir: Path, fix: str) -> Path:
    """Turn a path string into an absolute path, relative to `base_dir`, with `~` expanded."""
    if isinstance(value, Path):
        path = value
    elif isinstance(value, str) and value and "\0" not in value:
        path = Path(value)
    else:
        raise _InvalidValue("a path string", _describe_found(value), fix)
    try:
        return (base_dir / path.expanduser()).resolve()
    except RuntimeError as exc:  # an unknown ~user, or a symlink loop
        raise _InvalidValue("a path that can be resolved", f"{_quote(str(path))}: {exc}", fix) from exc
    except OSError as exc:  # ENAMETOOLONG, for example, for a component that is too long
        raise _InvalidValue(
            "a path that can be resolved", f"{_quote(str(path))}: {exc.strerror}", fix
        ) from exc


def _check_existing(path: Path, kind: str, expected: str, fix: str) -> Path:
    """Return `path` if it is an existing `kind` ("file" or "folder"), and raise _InvalidValue otherwise."""
    try:
        found = path.is_file() if kind == "file" else path.is_dir()
    except OSError as exc:  # is_file() and is_dir() of Python 3.11 raise ENAMETOOLONG, for example
        raise _InvalidValue(expected, f"{_quote(str(path))}: {exc.strerror}", fix) from exc
    if not found:
        problem = f"is not a {kind}" if path.exists() else "does not exist"
        raise _InvalidValue(expected, f"{_quote(str(path))}, which {problem}", fix)
    return path


def _split_host_port(address: str) -> tuple[str, int] | None:
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        return None
    port = int(port_text)
    if not 1 <= port <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(IPv6Address(host[1:-1])), port
        except ValueError:
            return None
    if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        return None
    return host, port


def _check_dashboard(value: Any) -> str | None:
    expected = '"HOST:PORT" with a port from 1 to 65535, or "off" or false'
    fix = (
        f'Write dashboard = "{DASHBOARD_DEFAULT}" for this machine only,'
        ' dashboard = "0.0.0.0:7070" for every network interface, or dashboard = "off".'
    )
    if value is False or value == "off":
        return None
    address = _require_string(value, expected, fix)
    if _split_host_port(address) is None:
        raise _InvalidValue(expected, _describe_found(address), fix)
    return address


def _check_cluster_key(value: Any) -> SecretStr | None:
    expected = f"a string of at least {CLUSTER_KEY_MIN_LENGTH} characters"
    fix = (
        "Use a long random string, for example the output of"
        " `python -c 'import secrets; print(secrets.token_urlsafe(32))'`,"
        " or remove cluster_key so that the supervisor generates one in the state folder."
    )
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str) or len(value) < CLUSTER_KEY_MIN_LENGTH:
        raise _InvalidValue(expected, _describe_secret(value), fix)
    return SecretStr(value)


def _is_identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _check_module(value: Any) -> str | None:
    expected = 'a dotted module name, "package.module" or "package.module:Name"'
    fix = 'Write for example module = "examples.orders".'
    if value is None:
        return None
    module = _require_string(value, expected, fix)
    module_path, separator, attribute = module.partition(":")
    valid = all(_is_identifier(part) for part in module_path.split(".")) and (
        not separator or _is_identifier(attribute)
    )
    if valid:
        return module

    if module.endswith(".py") or "/" in module:
        dotted = module.removesuffix(".py").strip("/").replace("/", ".")
        if all(_is_identifier(part) for part in dotted.split(".")):
            fix = f'Name the module, not the file: module = "{dotted}".'
    raise _InvalidValue(expected, _describe_found(module), fix)


def _check_command(value: Any) -> list[str] | None:
    expected = 'a non-empty array of strings, the program and its arguments: ["program", "arg"]'
    fix = 'Write for example command = ["redis-server", "--port", "6380"].'
    if value is None:
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # unbalanced quotes: keep the generic fix
            fix = f"Write the command as an array: command = {_toml_literal(shlex.split(value))}."
        raise _InvalidValue(expected, _describe_found(value), fix)
    if not isinstance(value, list) or not value:
        raise _InvalidValue(expected, _describe_found(value), fix)
    for index, item in enumerate(value):
        if not isinstance(item, str) or "\0" in item:
            found = f"{_describe_found(item)} at index {index}"
            raise _InvalidValue(expected, found, "Quote every argument as a string.")
    if not value[0]:
        raise _InvalidValue(expected, "an empty program name at index 0", fix)
    return list(value)


def _check_python(value: Any, base_dir: Path) -> str:
    """Return the interpreter as an absolute path. A bare name is looked up on PATH."""
    expected = "a Python interpreter: a path to an executable or a command name found on PATH"
    fix = f'Write for example python = "{sys.executable}", or remove the line to use that default.'
    interpreter = _require_string(value, expected, fix)
    if not interpreter:
        raise _InvalidValue(expected, '"" (an empty string)', fix)

    if "/" in interpreter or os.sep in interpreter:
        try:
            expanded = Path(interpreter).expanduser()
        except RuntimeError as exc:  # an unknown ~user
            raise _InvalidValue(expected, f"{_quote(interpreter)}: {exc}", fix) from exc
        # No resolve(): a virtual environment's python is a symlink that must stay unresolved.
        candidate = os.path.abspath(base_dir / expanded)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        raise _InvalidValue(expected, f"{_quote(candidate)}, which is not an executable file", fix)

    found = shutil.which(interpreter)
    if found is None:
        raise _InvalidValue(expected, f"{_quote(interpreter)}, which is not on PATH", fix)
    return os.path.abspath(found)


def _check_env_name(value: str) -> str:
    if not value or "=" in value or "\0" in value:
        raise _InvalidValue(
            'an environment variable name without "=" or NUL characters',
            _describe_found(value),
            "Rename the variable, for example LOG_LEVEL.",
            summary="invalid environment variable name",
        )
    return value


def _check_env_value(value: Any) -> str:
    expected = "a string (environment variables are text)"
    if isinstance(value, str) and "\0" not in value:
        return value
    if isinstance(value, bool | int | float):
        quoted = _toml_literal(_toml_literal(value))
        raise _InvalidValue(expected, _describe_found(value), suggestion=quoted)
    raise _InvalidValue(expected, _describe_found(value), "Write the value as a quoted string.")


def _check_service_name(value: str) -> str:
    if SERVICE_NAME_PATTERN.fullmatch(value):
        return value
    expected = 'a service name of 1 to 63 characters from a-z, 0-9, "_" and "-" that starts with a letter'
    fix = "Rename the table."
    candidate = re.sub(r"[^a-z0-9_-]", "-", value.lower()).strip("-_")[:63]
    if SERVICE_NAME_PATTERN.fullmatch(candidate):
        fix = f"Rename the table to [services.{candidate}]."
    raise _InvalidValue(expected, _describe_found(value), fix, summary="invalid service name")


ServiceName = Annotated[str, AfterValidator(_check_service_name)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
EnvValue = Annotated[str, BeforeValidator(_check_env_value)]


# --- cross-field checks ------------------------------------------------------------------


def _conflict(loc: tuple[str, ...], error: _InvalidValue, data: Any) -> InitErrorDetails:
    return {"type": "value_error", "loc": loc, "input": data, "ctx": {"error": error}}


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _validate_with_conflicts(
    title: str,
    data: Any,
    handler: ValidatorFunctionWrapHandler,
    conflicts: list[InitErrorDetails],
) -> Any:
    """Run the field validation and report its errors together with the conflicts found."""
    try:
        model = handler(data)
    except ValidationError as exc:
        details: list[InitErrorDetails] = [*conflicts, *map(_reinit_error, exc.errors())]
        raise ValidationError.from_exception_data(title, details) from None
    if conflicts:
        raise ValidationError.from_exception_data(title, conflicts)
    return model


def _reinit_error(error: ErrorDetails) -> InitErrorDetails:
    details: InitErrorDetails = {
        "type": error["type"],
        "loc": error["loc"],
        "input": error["input"],
    }
    if "ctx" in error:
        details["ctx"] = error["ctx"]
    return details


def _service_conflicts(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    conflicts: list[InitErrorDetails] = []
    has_module = data.get("module") is not None
    has_command = data.get("command") is not None
    fix = (
        'Use module = "package.module" for a Python service'
        ' or command = ["program", "arg"] for any other program.'
    )
    expected = "exactly one of module or command"
    if has_module and has_command:
        error = _InvalidValue(expected, "both", fix, summary="conflicting keys")
        conflicts.append(_conflict((), error, data))
    elif not has_module and not has_command:
        error = _InvalidValue(expected, "neither", fix, summary="missing key")
        conflicts.append(_conflict((), error, data))
    elif has_command and "python" in data:
        python_fix = "Remove python, or put the interpreter first in command."
        error = _InvalidValue("python only with module", "python with command", python_fix)
        conflicts.append(_conflict(("python",), error, data))

    initial_s = _as_number(data.get("backoff_initial_s", _BACKOFF_INITIAL_DEFAULT_S))
    max_s = _as_number(data.get("backoff_max_s", _BACKOFF_MAX_DEFAULT_S))
    if initial_s is not None and max_s is not None and max_s < initial_s:
        expected = f"a number of seconds of at least backoff_initial_s ({initial_s:g})"
        fix = f"Raise backoff_max_s to {initial_s:g} or more, or lower backoff_initial_s."
        error = _InvalidValue(expected, f"{max_s:g}", fix)
        conflicts.append(_conflict(("backoff_max_s",), error, data))
    return conflicts


def _supervisor_conflicts(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    if data.get("cluster_key") is None or data.get("cluster_key_file") is None:
        return []
    error = _InvalidValue(
        "either cluster_key or cluster_key_file",
        "both",
        "Remove one of them.",
        summary="conflicting keys",
    )
    return [_conflict(("cluster_key_file",), error, data)]


# --- models ------------------------------------------------------------------------------


_MODEL_CONFIG = ConfigDict(strict=True, extra="forbid", frozen=True, hide_input_in_errors=True)


def _seconds(default: float, *, minimum_s: float | None = None) -> Any:
    """Declare a duration field in seconds: finite, and > 0 unless `minimum_s` is given."""
    if minimum_s is None:
        return Field(default=default, gt=0, allow_inf_nan=False)
    return Field(default=default, ge=minimum_s, allow_inf_nan=False)


class SupervisorSettings(BaseModel):
    """The [supervisor] table: settings of this node's supervisor."""

    model_config = _MODEL_CONFIG

    node: str = Field(default_factory=default_node_name, validate_default=True)
    broker: str = BROKER_AUTO
    exchange: str = "mrq"
    state_dir: Path = Field(default=Path(".mrq"), validate_default=True)
    heartbeat_interval_s: float = _seconds(1.0, minimum_s=0.05)
    heartbeat_misses: int = Field(default=3, ge=1)
    start_timeout_s: float = _seconds(30.0)
    dashboard: str | None = Field(default=DASHBOARD_DEFAULT, validate_default=True)
    cluster_key: SecretStr | None = None
    cluster_key_file: Path | None = None
    command_max_age_s: float = _seconds(30.0)
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    log_backups: int = Field(default=3, ge=0)
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"

    @model_validator(mode="wrap")
    @classmethod
    def _validate_table(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Self:
        if not isinstance(data, Mapping):
            return handler(data)  # type: ignore[no-any-return]
        conflicts = _supervisor_conflicts(data)
        return _validate_with_conflicts(cls.__name__, data, handler, conflicts)  # type: ignore[no-any-return]

    @field_validator("node", mode="before")
    @classmethod
    def _validate_node(cls, value: Any) -> str:
        return _check_node_name(value)

    @field_validator("broker", mode="before")
    @classmethod
    def _validate_broker(cls, value: Any) -> str:
        return _check_broker(value)

    @field_validator("exchange", mode="before")
    @classmethod
    def _validate_exchange(cls, value: Any) -> str:
        return _check_exchange(value)

    @field_validator("state_dir", mode="before")
    @classmethod
    def _validate_state_dir(cls, value: Any, info: ValidationInfo) -> Path:
        fix = 'Write for example state_dir = ".mrq".'
        return _resolve_path(value, _config_dir(info), fix)

    @field_validator("dashboard", mode="before")
    @classmethod
    def _validate_dashboard(cls, value: Any) -> str | None:
        return _check_dashboard(value)

    @field_validator("cluster_key", mode="before")
    @classmethod
    def _validate_cluster_key(cls, value: Any) -> SecretStr | None:
        return _check_cluster_key(value)

    @field_validator("cluster_key_file", mode="before")
    @classmethod
    def _validate_cluster_key_file(cls, value: Any, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        fix = "Create the file, correct the path, or remove cluster_key_file."
        path = _resolve_path(value, _config_dir(info), fix)
        return _check_existing(path, "file", "an existing file that contains the cluster key", fix)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "broker" else value

    @property
    def control_exchange(self) -> str:
        """Name of the exchange for control commands and supervisor events."""
        return f"{self.exchange}{CONTROL_EXCHANGE_SUFFIX}"

    def dashboard_address(self) -> tuple[str, int] | None:
        """Return the dashboard's (host, port) to bind, or None when it is off.

        An IPv6 host is returned without its brackets.
        """
        if self.dashboard is None:
            return None
        address = _split_host_port(self.dashboard)
        if address is None:
            raise ValueError(f"invalid dashboard address {self.dashboard!r}")
        return address


class ServiceConfig(BaseModel):
    """A [services.NAME] table: one service and how to run and restart its instances."""

    model_config = _MODEL_CONFIG

    module: str | None = None
    command: list[str] | None = None
    python: str = Field(default_factory=lambda: sys.executable, validate_default=True)
    replicas: int = Field(default=1, ge=0, le=256)
    restart: RestartPolicy = "always"
    max_restarts: int = Field(default=5, ge=0)
    restart_window_s: float = _seconds(60.0)
    backoff_initial_s: float = _seconds(_BACKOFF_INITIAL_DEFAULT_S)
    backoff_max_s: float = _seconds(_BACKOFF_MAX_DEFAULT_S)
    stable_after_s: float = _seconds(30.0)
    stop_timeout_s: float = _seconds(10.0)
    max_memory_mb: int | None = Field(default=None, gt=0, examples=[512])
    max_memory_grace_s: float = _seconds(10.0)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    cwd: Path
    heartbeat: bool
    prefetch: int = Field(default=32, ge=1, le=65535)
    concurrency: int = Field(default=32, ge=1)
    queue_type: QueueType = "classic"

    @model_validator(mode="wrap")
    @classmethod
    def _validate_table(cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Self:
        if not isinstance(data, Mapping):
            return handler(data)  # type: ignore[no-any-return]
        data = dict(data)
        data.setdefault("cwd", _config_dir(info))
        # A program started by `command` need not speak the heartbeat protocol.
        data.setdefault("heartbeat", data.get("command") is None)
        conflicts = _service_conflicts(data)
        return _validate_with_conflicts(cls.__name__, data, handler, conflicts)  # type: ignore[no-any-return]

    @field_validator("module", mode="before")
    @classmethod
    def _validate_module(cls, value: Any) -> str | None:
        return _check_module(value)

    @field_validator("command", mode="before")
    @classmethod
    def _validate_command(cls, value: Any) -> list[str] | None:
        return _check_command(value)

    @field_validator("python", mode="before")
    @classmethod
    def _validate_python(cls, value: Any, info: ValidationInfo) -> str:
        return _check_python(value, _config_dir(info))

    @field_validator("cwd", mode="before")
    @classmethod
    def _validate_cwd(cls, value: Any, info: ValidationInfo) -> Path:
        fix = "Create the folder, correct the path, or remove cwd to use the config file's folder."
        path = _resolve_path(value, _config_dir(info), fix)
        return _check_existing(path, "folder", "an existing folder", fix)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Environment values often hold credentials, so the repr shows only their names.
        for name, value in super().__repr_args__():
            yield name, dict.fromkeys(value, _MASK) if name == "env" else value

    @property
    def kind(self) -> ServiceKind:
        """Kind of service: "python" for a module run by the worker, "program" for a command."""
        return "python" if self.module is not None else "program"

    def fingerprint(self) -> str:
        """Return a SHA-256 hex digest of every setting except `replicas`.

        Two versions of a service with the same fingerprint run the same instances,
        so a reload needs to restart only the services whose fingerprint changed. A
        change of `replicas` alone is a scaling change and keeps the fingerprint.
        """
        settings = self.model_dump(mode="json", exclude={"replicas"})
        encoded = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(encoded.encode()).hexdigest()


class SupervisorConfig(BaseModel):
    """A whole supervisor.toml: the file's path, [supervisor] and every [services.NAME]."""

    model_config = _MODEL_CONFIG

    path: Path
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    services: dict[ServiceName, ServiceConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _validate_document(cls, data: Any) -> Any:
        # Validate a missing [supervisor] here, with the context, so that state_dir
        # is resolved against the config file's folder.
        if isinstance(data, Mapping) and "supervisor" not in data:
            return {**data, "supervisor": {}}
        return data


# --- translation of validation errors ----------------------------------------------------

_TOP_LEVEL_KEYS: Final = ("supervisor", "services")
_TABLE_ERROR_TYPES: Final = frozenset({"model_type", "dict_type", "model_attributes_type"})
_TYPE_DESCRIPTIONS: Final[Mapping[Any, str]] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
}


def _key_path(loc: Sequence[str | int]) -> str:
    """Render a pydantic error location as a dotted TOML key path: services.orders.env.PORT."""
    parts: list[str] = []
    for item in loc:
        if item == "[key]":
            continue
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        else:
            parts.append(_toml_key(str(item)))
    return ".".join(parts)


def _table_name(loc: Sequence[str | int]) -> str:
    return f"[{_key_path(loc)}]" if loc else "the top level"


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """Return the model that validates the table at `loc`, if any."""
    if tuple(loc) == ("supervisor",):
        return SupervisorSettings
    if len(loc) == 2 and loc[0] == "services":
        return ServiceConfig
    return None


def _known_keys(loc: Sequence[str | int]) -> list[str]:
    if not loc:
        return list(_TOP_LEVEL_KEYS)
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _unknown_key_message(loc: Sequence[str | int]) -> str:
    parent, name = loc[:-1], str(loc[-1])
    known = _known_keys(parent)
    table = _table_name(parent)
    suggestion = _did_you_mean(name, known)
    if suggestion is not None:
        fix = f"Did you mean {suggestion}? Rename the key or remove it."
    elif name in ServiceConfig.model_fields and parent[:1] != ("services",):
        fix = f"{name} is a key of [services.NAME] tables. Move it there or remove it."
    elif name in SupervisorSettings.model_fields and parent != ("supervisor",):
        fix = f"{name} is a key of [supervisor]. Move it there or remove it."
    else:
        fix = f"Remove it. The keys of {table} are: {', '.join(known)}."
    return _problem_text("unknown key", f"a key of {table}", _quote(name), fix)


def _strip_optional(annotation: Any) -> Any:
    arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
    if get_origin(annotation) is not Literal and len(arguments) == 1:
        return arguments[0]
    return annotation


def _describe_bounds(field: FieldInfo) -> str:
    limits = {
        kind: getattr(item, kind)
        for item in field.metadata
        for kind in ("gt", "ge", "lt", "le")
        if getattr(item, kind, None) is not None
    }
    if "ge" in limits and "le" in limits:
        return f" from {limits['ge']} to {limits['le']}"
    texts = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
    parts = [f"{texts[kind]} {limit}" for kind, limit in limits.items()]
    return ", " + ", ".join(parts) if parts else ""


def _describe_field(name: str, field: FieldInfo) -> str:
    """Describe the values a field accepts: "an integer from 0 to 256"."""
    annotation = _strip_optional(field.annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(_toml_literal(choice) for choice in get_args(annotation))
    if annotation is float and name.endswith("_s"):
        return "a number of seconds" + _describe_bounds(field)
    return _TYPE_DESCRIPTIONS.get(annotation, "a valid value") + _describe_bounds(field)


def _field_fix(name: str, field: FieldInfo, value: Any) -> str:
    annotation = _strip_optional(field.annotation)
    key = _toml_key(name)
    if get_origin(annotation) is Literal and isinstance(value, str):
        suggestion = _did_you_mean(value, [str(choice) for choice in get_args(annotation)])
        if suggestion is not None:
            return f"Did you mean {key} = {_toml_literal(suggestion)}?"
    if annotation in (int, float) and isinstance(value, str):
        number = _parse_number(value, annotation)
        if number is not None:
            return f"Remove the quotes: {key} = {_toml_literal(number)}."
    if annotation is int and isinstance(value, float) and value.is_integer():
        return f"Write it as an integer: {key} = {int(value)}."

    default = field.default
    example = field.examples[0] if field.examples else default
    if example is PydanticUndefined or example is None:
        return ""
    fix = f"Write for example {key} = {_toml_literal(example)}"
    if default is PydanticUndefined:
        return f"{fix}."
    if default is None:
        return f"{fix}, or remove the line to leave it unset."
    if example == default:
        return f"{fix} (the default), or remove the line."
    return f"{fix}, or remove the line to use the default {_toml_literal(default)}."


def _parse_number(text: str, annotation: Any) -> int | float | None:
    try:
        return int(text) if annotation is int else float(text)
    except ValueError:
        return None


def _field_error_message(error: ErrorDetails, loc: Sequence[str | int]) -> str:
    model = _model_at(loc[:-1])
    name = str(loc[-1])
    value = error["input"]
    found = _describe_secret(value) if name == "cluster_key" else _describe_found(value)
    field = model.model_fields.get(name) if model is not None else None
    if field is None:
        return _problem_text("invalid value", error["msg"].lower(), found, "")
    return _problem_text("invalid value", _describe_field(name, field), found, _field_fix(name, field, value))


def _invalid_value_message(error: _InvalidValue, loc: Sequence[str | int]) -> str:
    fix = error.fix
    if error.suggestion is not None:
        name = _toml_key(str(loc[-1])) if loc else "key"
        fix = f"Write it as {name} = {error.suggestion}."
    return _problem_text(error.summary, error.expected, error.found, fix)


def _table_error_message(error: ErrorDetails, loc: Sequence[str | int]) -> str:
    if tuple(loc) == ("services",):
        return _no_services_message("a value that is not a table")
    fix = f"Write {_table_name(loc)} on a line of its own, followed by its keys."
    return _problem_text("invalid value", f"a table {_table_name(loc)}", _describe_found(error["input"]), fix)


def _no_services_message(found: str) -> str:
    fix = 'Add a service, for example a [services.orders] table with module = "examples.orders".'
    return _problem_text("no services", "at least one [services.NAME] table", found, fix)


def _problem_from_error(error: ErrorDetails, env_sources: Mapping[tuple[str, ...], str]) -> ConfigProblem:
    loc = tuple(error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _InvalidValue):
        message = _invalid_value_message(cause, [item for item in loc if item != "[key]"])
    elif error["type"] == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif loc == ("services",) and error["type"] == "missing":
        message = _no_services_message("none")
    elif loc == ("services",) and error["type"] == "too_short":
        message = _no_services_message("an empty [services] table")
    elif error["type"] in _TABLE_ERROR_TYPES:
        message = _table_error_message(error, loc)
    else:
        message = _field_error_message(error, loc)

    key = _key_path(loc)
    variable = env_sources.get(tuple(str(item) for item in loc))
    if variable is not None:
        key = f"{key} (from {variable})"
        message = (
            f"{message} The value comes from the environment variable {variable}, which overrides the file."
        )
    return ConfigProblem(key, message)


# --- loading -----------------------------------------------------------------------------

_TOML_ERROR_POSITION: Final = re.compile(
    r"(?P<reason>.*) \((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)",
    re.DOTALL,
)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> SupervisorConfig:
    """Read and validate a supervisor.toml file, then apply the MRQ_* overrides from `env`.

    `env` defaults to os.environ. Relative paths in the file are relative to the
    file's folder. This does blocking file I/O, so call it through
    anyio.to_thread.run_sync from async code.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML, or invalid. The
            message lists every problem found, one per line.
    """
    config_path = _absolute(path)
    text = _read_config_text(config_path)
    return parse_config(text, config_path, env)


def parse_config(text: str, path: Path, env: Mapping[str, str] | None = None) -> SupervisorConfig:
    """Validate the text of a supervisor.toml file, then apply the MRQ_* overrides from `env`.

    `path` names the file in messages, and relative paths in the text are relative
    to its folder. `env` defaults to os.environ.

    Raises:
        ConfigError: as for load_config.
    """
    config_path = _absolute(path)
    document = _parse_toml(text, config_path)
    problems = _pop_unknown_top_level_keys(document)
    env_sources = _apply_env_overrides(document, os.environ if env is None else env)

    context = {_CONFIG_DIR_CONTEXT_KEY: config_path.parent}
    try:
        config = SupervisorConfig.model_validate({**document, "path": config_path}, context=context)
    except ValidationError as exc:
        problems.extend(_problem_from_error(error, env_sources) for error in exc.errors())
        raise ConfigError(config_path, list(dict.fromkeys(problems))) from exc

    if problems:
        raise ConfigError(config_path, problems)
    return config


def load_supervisor_settings(path: Path, env: Mapping[str, str] | None = None) -> SupervisorSettings:
    """Read only the [supervisor] table and its MRQ_* overrides, as the CLI needs.

    A mistake in a [services] table must not keep an operator from reaching the
    running supervisor, so the services are not validated here.

    Raises:
        ConfigError: the file is missing, not TOML, or its [supervisor] table is invalid.
    """
    config_path = _absolute(path)
    document = _parse_toml(_read_config_text(config_path), config_path)
    table: dict[str, Any] = {"supervisor": document.get("supervisor", {})}
    env_sources = _apply_env_overrides(table, os.environ if env is None else env)
    context = {_CONFIG_DIR_CONTEXT_KEY: config_path.parent}
    try:
        return SupervisorSettings.model_validate(table["supervisor"], context=context)
    except ValidationError as exc:
        problems = [
            _problem_from_error({**error, "loc": ("supervisor", *error["loc"])}, env_sources)
            for error in exc.errors()
        ]
        raise ConfigError(config_path, list(dict.fromkeys(problems))) from exc


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def _read_config_text(path: Path) -> str:
    how_to_choose = (
        f"Give the path of an existing file with -c PATH (without -c, ./{DEFAULT_CONFIG_FILE} "
        "in the current folder is read)."
    )
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        message = f"config file not found: looked for {path}. {how_to_choose}"
        raise ConfigError(path, [ConfigProblem("", message)]) from exc
    except IsADirectoryError as exc:
        message = f"expected a config file, found a folder. {how_to_choose}"
        raise ConfigError(path, [ConfigProblem("", message)]) from exc
    except OSError as exc:
        message = f"cannot read the config file: {exc.strerror}. Check its permissions."
        raise ConfigError(path, [ConfigProblem("", message)]) from exc

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        message = f"invalid UTF-8 byte 0x{data[exc.start]:02x}: TOML files must be saved as UTF-8."
        raise ConfigError(path, [ConfigProblem("", message, line, column)]) from exc


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [_syntax_problem(str(exc), text)]) from exc


def _syntax_problem(message: str, text: str) -> ConfigProblem:
    """Turn a tomllib error message into a problem with line, column and the source line."""
    match = _TOML_ERROR_POSITION.fullmatch(message)
    if match is None:
        return ConfigProblem("", f"invalid TOML: {message}.")

    lines = text.split("\n")
    reason = match["reason"]
    if match["line"] is not None:
        line, column = int(match["line"]), int(match["column"])
    else:
        line, column = len(lines), len(lines[-1]) + 1
        reason = f"{reason} at the end of the file"

    source = lines[line - 1] if line <= len(lines) else ""
    # One "?" per non-printable character keeps the excerpt on one line and the caret aligned.
    source = "".join(char if char.isprintable() or char == "\t" else "?" for char in source)
    caret = re.sub(r"[^\t]", " ", source[: column - 1]) + "^"
    reason = reason[:1].lower() + reason[1:]
    fix = "Correct the TOML syntax at this position."
    return ConfigProblem("", f"invalid TOML: {reason}. {fix}\n    {source}\n    {caret}", line, column)


def _pop_unknown_top_level_keys(document: dict[str, Any]) -> list[ConfigProblem]:
    problems = []
    for name in [name for name in document if name not in _TOP_LEVEL_KEYS]:
        del document[name]
        problems.append(ConfigProblem(_toml_key(name), _unknown_key_message((name,))))
    return problems


def _apply_env_overrides(document: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Copy the MRQ_* variables that are set and not empty into [supervisor].

    Returns the key path of each overridden key with the name of its variable.
    """
    overrides = {key: env[variable] for variable, key in ENV_OVERRIDES.items() if env.get(variable)}
    table = document.setdefault("supervisor", {})
    if not overrides or not isinstance(table, dict):
        return {}

    if "state_dir" in overrides:
        # A path in a variable is relative to the current directory, like one on a command line.
        overrides["state_dir"] = os.path.abspath(os.path.expanduser(overrides["state_dir"]))
    if "cluster_key" in overrides:
        table.pop("cluster_key_file", None)
    table.update(overrides)
    return {("supervisor", key): variable for variable, key in ENV_OVERRIDES.items() if key in overrides}
