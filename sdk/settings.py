"""Settings of a service process.

Each value comes from the first source that sets it, highest first: code
(`settings.broker_url = ...`, or arguments of `Client` and `run`), `MRQ_*`
environment variables, the module named by `SETTINGS_MODULE`, defaults.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from sdk import names
from sdk.errors import SettingsError

ENV_PREFIX = "MRQ_"
SETTINGS_MODULE_VAR = "SETTINGS_MODULE"

# Upper-case names that a settings module may use besides the field names.
MODULE_ALIASES = {
    "HOST_RABBITMQ": "broker_url",
    "EXCHANGE": "exchange",
    "SERVICE_NAME": "service_name",
    "SERVICE_KEY": "service_key",
    "HOST_SERVICE": "host_service",
}


def _default_node() -> str:
    label = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in label).strip("-_")
    return cleaned or "node"


class SettingsModel(BaseModel):
    """The resolved settings of one process."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    broker_url: str = "amqp://guest:guest@localhost:5672/"
    exchange: str = names.DEFAULT_EXCHANGE
    service_name: str | None = None
    service_key: SecretStr | None = None
    host_service: str | None = None
    node: str = Field(default_factory=_default_node)
    instance: int = Field(0, ge=0)
    cluster_key: SecretStr | None = None
    prefetch: int = Field(32, ge=1, le=65535)
    concurrency: int = Field(32, ge=1)
    queue_type: Literal["classic", "quorum"] = "classic"
    retries: int = Field(3, ge=0)
    retry_delay_s: float = Field(1.0, ge=0)
    retry_delay_max_s: float = Field(300.0, gt=0)
    max_redeliveries: int = Field(5, ge=0)
    stop_timeout_s: float = Field(10.0, gt=0)
    publish_timeout_s: float = Field(30.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    rpc_timeout_s: float = Field(30.0, gt=0)
    handler_timeout_s: float | None = Field(None, gt=0)
    max_message_bytes: int = Field(128 * 1024 * 1024, ge=1)
    heartbeat_interval_s: float = Field(1.0, ge=0.05)
    heartbeat_misses: int = Field(3, ge=1)
    command_max_age_s: float = Field(30.0, gt=0)
    log_level: Literal["trace", "debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        return normalize_broker_url(value)

    @field_validator("exchange")
    @classmethod
    def _check_exchange(cls, value: str) -> str:
        if not value or len(value) > 200 or not all(c.isalnum() or c in "-_.:" for c in value):
            raise ValueError("expected letters, digits and - _ . : (at most 200 characters)")
        return value

    @field_validator("service_name")
    @classmethod
    def _check_service_name(cls, value: str | None) -> str | None:
        if value is not None and not names.SERVICE_NAME_RE.match(value):
            raise ValueError("expected a lower-case name such as 'billing' (a-z, 0-9, - and _)")
        return value

    @field_validator("node")
    @classmethod
    def _check_node(cls, value: str) -> str:
        if not names.NODE_NAME_RE.match(value) or value == "all":
            raise ValueError("expected a lower-case name such as 'web-1' (a-z, 0-9, - and _)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name == "broker_url" else value)

    @property
    def control_exchange(self) -> str:
        return names.control_exchange(self.exchange)

    def masked_broker_url(self) -> str:
        return mask_url(self.broker_url)

    def cluster_key_bytes(self) -> bytes | None:
        if self.cluster_key is None:
            return None
        return self.cluster_key.get_secret_value().encode()


FIELDS = frozenset(SettingsModel.model_fields)


_URL_FORM = "expected an AMQP URL such as amqp://user:password@host:5672/ or a bare host[:port]"


def normalize_broker_url(value: str) -> str:
    """Return an AMQP URL; a bare `host[:port]` gets guest credentials and port 5672."""
    value = value.strip()
    if "://" not in value:
        host, _, port = value.partition(":")
        if not host or any(c in host for c in "@/?#") or (port and not _valid_port(port)):
            raise ValueError(_URL_FORM)
        return f"amqp://guest:guest@{host}:{port or 5672}/"
    parts = urlsplit(value)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(_URL_FORM)
    try:
        parts.port  # noqa: B018 - reading it validates the port
    except ValueError:
        raise ValueError(f"{_URL_FORM}; the port must be a number from 1 to 65535") from None
    return value


def _valid_port(port: str) -> bool:
    return port.isdigit() and 1 <= int(port) <= 65535


def mask_url(url: str) -> str:
    """Return the URL with its password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.password is None:
        return url
    # The host and port stay as written: parsing them fails on a bad port and drops IPv6 brackets.
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _mask_any_url(value: str) -> str:
    """Mask the credentials of a broker URL, even of one too malformed for `mask_url`."""
    masked = mask_url(value)
    if masked == value and "@" in value:
        scheme, separator, rest = value.rpartition("://")
        return f"{scheme}{separator}***@{rest.rpartition('@')[2]}"
    return masked


class _Layer:
    """Values of one source, with a label for each so that errors can name it."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.labels: dict[str, str] = {}

    def set(self, field: str, value: Any, label: str) -> None:
        self.values[field] = value
        self.labels[field] = label


def _module_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    module_name = environ.get(SETTINGS_MODULE_VAR)
    if not module_name:
        return layer
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SettingsError(
            f"{SETTINGS_MODULE_VAR}={module_name!r} could not be imported ({exc}); "
            "set it to an importable module name or unset it"
        ) from exc
    for attribute in dir(module):
        if not attribute.isupper():
            continue
        field = MODULE_ALIASES.get(attribute) or attribute.lower()
        if field in FIELDS:
            layer.set(field, getattr(module, attribute), f"{module_name}.{attribute}")
    return layer


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for field in FIELDS:
        variable = ENV_PREFIX + field.upper()
        if variable in environ:
            layer.set(field, environ[variable], variable)
    return layer


def _explain(error: ValidationError, labels: Mapping[str, str], values: Mapping[str, Any]) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        source = labels.get(field, "code")
        value = values.get(field, "<missing>")
        if field in ("cluster_key", "service_key"):
            value = "***"
        elif field == "broker_url" and isinstance(value, str):
            value = _mask_any_url(value)
        lines.append(f"invalid setting {field} from {source}={value!r}: {item['msg']}")
    return "; ".join(lines)


def resolve(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> SettingsModel:
    """Merge the sources and validate the result; raise SettingsError naming the culprit."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    labels: dict[str, str] = {}
    code = _Layer()
    for field, value in (overrides or {}).items():
        if field not in FIELDS:
            raise SettingsError(f"unknown setting {field!r}; known settings: {', '.join(sorted(FIELDS))}")
        code.set(field, value, "code")
    for layer in (_module_layer(environ), _env_layer(environ), code):
        merged.update(layer.values)
        labels.update(layer.labels)
    try:
        return SettingsModel.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_explain(exc, labels, merged)) from None


class Settings:
    """The process-wide settings: read attributes, assign them before start.

    Reading resolves the sources once and caches the result; an assignment or
    `reload()` resolves them again on the next read.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_overrides", {})
        object.__setattr__(self, "_cache", None)

    def resolve(self, **overrides: Any) -> SettingsModel:
        """Return the resolved settings, with `overrides` (from code) on top."""
        if overrides:
            return resolve({**self._overrides, **overrides})
        if self._cache is None:
            object.__setattr__(self, "_cache", resolve(self._overrides))
        cached: SettingsModel = self._cache
        return cached

    def configure(self, **values: Any) -> None:
        """Set several values from code at once; they win over every other source."""
        candidate = {**self._overrides, **values}
        resolved = resolve(candidate)
        object.__setattr__(self, "_overrides", candidate)
        object.__setattr__(self, "_cache", resolved)

    def reload(self) -> None:
        """Drop the cached values, so that the next read resolves the environment again."""
        object.__setattr__(self, "_cache", None)

    def reset(self) -> None:
        """Drop every value set from code (for tests)."""
        object.__setattr__(self, "_overrides", {})
        object.__setattr__(self, "_cache", None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.configure(**{name: value})

    def __repr__(self) -> str:
        try:
            resolved = self.resolve()
        except SettingsError as exc:
            return f"<Settings invalid: {exc}>"
        shown = resolved.model_dump(exclude={"cluster_key", "service_key"})
        shown["broker_url"] = mask_url(resolved.broker_url)
        return f"<Settings {shown}>"


settings = Settings()
