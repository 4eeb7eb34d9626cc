"""Tests of supervisor.toml loading and validation, on real files in a temporary folder."""

import json
import re
import socket
import sys
import traceback
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import (
    ENV_OVERRIDES,
    ConfigError,
    ServiceConfig,
    SupervisorConfig,
    load_config,
    parse_config,
)

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parent.parent
MINIMAL_SERVICE = '[services.orders]\nmodule = "examples.orders"\n'
CLUSTER_KEY = "s3cret-cluster-key-0123456789"
BROKER_PASSWORD = "hunter2-broker-pw"


def write_config(folder: Path, text: str) -> Path:
    path = folder / "supervisor.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(folder: Path, text: str, env: dict[str, str] | None = None) -> SupervisorConfig:
    return load_config(write_config(folder, text), env={} if env is None else env)


def config_error(folder: Path, text: str, match: str, env: dict[str, str] | None = None) -> str:
    """Load `text` from a file, expect a ConfigError that matches, and return its message."""
    path = write_config(folder, text)
    with pytest.raises(ConfigError, match=match) as caught:
        load_config(path, env={} if env is None else env)
    message = str(caught.value)
    assert str(path) in message
    return message


def service_error(folder: Path, body: str, match: str) -> str:
    return config_error(folder, f"[services.orders]\n{body}\n", match)


# --- valid files -------------------------------------------------------------------------


def test_repository_example_file_parses() -> None:
    config = load_config(REPO_ROOT / "supervisor.toml", env={})

    assert config.path == REPO_ROOT / "supervisor.toml"
    assert list(config.services) == ["orders", "billing", "notifications"]
    assert config.services["orders"].module == "examples.orders"
    assert config.services["billing"].module == "examples.billing"
    assert config.services["notifications"].module == "examples.notifications"
    assert config.services["billing"].replicas == 2
    assert config.services["orders"].replicas == 1
    assert all(service.kind == "python" for service in config.services.values())
    assert config.supervisor.state_dir == REPO_ROOT / ".mrq"
    assert config.supervisor.dashboard_address() == ("127.0.0.1", 7070)


def test_supervisor_defaults(tmp_path: Path) -> None:
    settings = load_text(tmp_path, MINIMAL_SERVICE).supervisor

    assert settings.node == socket.gethostname().split(".")[0].lower()
    assert settings.broker == "auto"
    assert settings.exchange == "mrq"
    assert settings.control_exchange == "mrq.control"
    assert settings.state_dir == tmp_path.resolve() / ".mrq"
    assert settings.heartbeat_interval_s == 1.0
    assert settings.heartbeat_misses == 3
    assert settings.start_timeout_s == 30.0
    assert settings.dashboard_address() == ("127.0.0.1", 7070)
    assert settings.cluster_key is None
    assert settings.cluster_key_file is None
    assert settings.command_max_age_s == 30.0
    assert settings.log_max_bytes == 10 * 1024 * 1024
    assert settings.log_backups == 3
    assert settings.log_level == "info"
    assert settings.log_format == "text"


def test_service_defaults(tmp_path: Path) -> None:
    service = load_text(tmp_path, MINIMAL_SERVICE).services["orders"]

    assert service.kind == "python"
    assert service.command is None
    assert service.python == sys.executable
    assert service.replicas == 1
    assert service.restart == "always"
    assert service.max_restarts == 5
    assert service.restart_window_s == 60.0
    assert service.backoff_initial_s == 0.5
    assert service.backoff_max_s == 30.0
    assert service.stable_after_s == 30.0
    assert service.stop_timeout_s == 10.0
    assert service.max_memory_mb is None
    assert service.max_memory_grace_s == 10.0
    assert service.env == {}
    assert service.cwd == tmp_path.resolve()
    assert service.heartbeat is True
    assert service.prefetch == 32
    assert service.concurrency == 32
    assert service.queue_type == "classic"


def test_command_service_defaults_to_no_heartbeat(tmp_path: Path) -> None:
    text = """
[services.cache]
command = ["redis-server", "--port", "6380"]

[services.speaker]
command = ["./speaker"]
heartbeat = true
"""
    services = load_text(tmp_path, text).services

    assert services["cache"].kind == "program"
    assert services["cache"].command == ["redis-server", "--port", "6380"]
    assert services["cache"].heartbeat is False
    assert services["speaker"].heartbeat is True


def test_all_keys_accept_valid_values(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "cluster.key").write_text(CLUSTER_KEY)
    text = """
[supervisor]
node = "web-1"
broker = "amqps://app:pw@127.0.0.1:5671/prod"
exchange = "shop.events"
state_dir = "/tmp/mrq-state"
heartbeat_interval_s = 0.05
heartbeat_misses = 1
start_timeout_s = 5
dashboard = "off"
cluster_key_file = "cluster.key"
command_max_age_s = 2.5
log_max_bytes = 1
log_backups = 0
log_level = "debug"
log_format = "json"

[services.orders]
module = "examples.orders:OrdersService"
replicas = 256
restart = "on-failure"
max_restarts = 0
restart_window_s = 1
backoff_initial_s = 2
backoff_max_s = 2
stable_after_s = 0.1
stop_timeout_s = 0.5
max_memory_mb = 512
max_memory_grace_s = 3
env = { DB_URL = "postgres://127.0.0.1/app", EMPTY = "" }
cwd = "work"
heartbeat = false
prefetch = 65535
concurrency = 1
queue_type = "quorum"
"""
    config = load_text(tmp_path, text)
    settings, service = config.supervisor, config.services["orders"]

    assert settings.node == "web-1"
    assert settings.broker == "amqps://app:pw@127.0.0.1:5671/prod"
    assert settings.control_exchange == "shop.events.control"
    assert settings.state_dir == Path("/tmp/mrq-state")
    assert settings.dashboard is None
    assert settings.dashboard_address() is None
    assert settings.cluster_key_file == (tmp_path / "cluster.key").resolve()
    assert settings.log_format == "json"
    assert service.module == "examples.orders:OrdersService"
    assert service.replicas == 256
    assert service.restart == "on-failure"
    assert service.max_memory_mb == 512
    assert service.env == {"DB_URL": "postgres://127.0.0.1/app", "EMPTY": ""}
    assert service.cwd == (tmp_path / "work").resolve()
    assert service.heartbeat is False
    assert service.queue_type == "quorum"


@pytest.mark.parametrize(
    ("setting", "address"),
    [
        ('"127.0.0.1:7070"', ("127.0.0.1", 7070)),
        ('"0.0.0.0:8080"', ("0.0.0.0", 8080)),
        ('"localhost:9000"', ("localhost", 9000)),
        ('"[::1]:7070"', ("::1", 7070)),
        ('"off"', None),
        ("false", None),
    ],
)
def test_dashboard_address_forms(tmp_path: Path, setting: str, address: Any) -> None:
    text = f"[supervisor]\ndashboard = {setting}\n{MINIMAL_SERVICE}"
    settings = load_text(tmp_path, text).supervisor

    assert settings.dashboard_address() == address


def test_relative_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    (config_dir / "app").mkdir(parents=True)
    (config_dir / "keys").mkdir()
    (config_dir / "keys" / "cluster.key").write_text(CLUSTER_KEY)
    interpreter = config_dir / "bin" / "python"
    interpreter.parent.mkdir()
    interpreter.write_text("#!/bin/sh\n")
    interpreter.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = """
[supervisor]
state_dir = "../state"
cluster_key_file = "keys/cluster.key"

[services.orders]
module = "examples.orders"
cwd = "app"
python = "bin/python"
"""
    config = load_text(config_dir, text)

    assert config.supervisor.state_dir == tmp_path.resolve() / "state"
    assert config.supervisor.cluster_key_file == (config_dir / "keys" / "cluster.key").resolve()
    assert config.services["orders"].cwd == (config_dir / "app").resolve()
    assert config.services["orders"].python == str(interpreter)


def test_python_name_is_looked_up_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    interpreter = bin_dir / "python-for-test"
    interpreter.write_text("#!/bin/sh\n")
    interpreter.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    text = '[services.orders]\nmodule = "examples.orders"\npython = "python-for-test"\n'

    service = load_text(tmp_path, text).services["orders"]

    assert service.python == str(interpreter)


def test_parse_config_resolves_paths_against_given_path(tmp_path: Path) -> None:
    text = f'[supervisor]\nstate_dir = "state"\n{MINIMAL_SERVICE}'

    config = parse_config(text, tmp_path / "supervisor.toml", env={})

    assert config.path == tmp_path / "supervisor.toml"
    assert config.supervisor.state_dir == tmp_path.resolve() / "state"
    assert config.services["orders"].cwd == tmp_path.resolve()


# --- environment overrides ---------------------------------------------------------------


def test_env_overrides_win_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cluster.key").write_text("a-key-from-a-file-000000")
    text = f"""
[supervisor]
node = "from-file"
broker = "amqp://guest:guest@127.0.0.1:5672/"
exchange = "file-exchange"
state_dir = "file-state"
cluster_key_file = "cluster.key"
{MINIMAL_SERVICE}"""
    env = {
        "MRQ_NODE": "from-env",
        "MRQ_BROKER_URL": "amqp://guest:guest@127.0.0.1:5673/",
        "MRQ_EXCHANGE": "env-exchange",
        "MRQ_STATE_DIR": "env-state",
        "MRQ_CLUSTER_KEY": CLUSTER_KEY,
    }
    settings = load_text(tmp_path / "", text, env).supervisor

    assert settings.node == "from-env"
    assert settings.broker == "amqp://guest:guest@127.0.0.1:5673/"
    assert settings.exchange == "env-exchange"
    assert settings.control_exchange == "env-exchange.control"
    assert settings.state_dir == tmp_path.resolve() / "env-state"
    assert settings.cluster_key is not None
    assert settings.cluster_key.get_secret_value() == CLUSTER_KEY
    assert settings.cluster_key_file is None


def test_env_state_dir_is_relative_to_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    current = tmp_path / "current"
    current.mkdir()
    monkeypatch.chdir(current)

    settings = load_text(config_dir, MINIMAL_SERVICE, {"MRQ_STATE_DIR": "state"}).supervisor

    assert settings.state_dir == current.resolve() / "state"


def test_empty_env_variable_is_ignored(tmp_path: Path) -> None:
    text = f'[supervisor]\nnode = "from-file"\n{MINIMAL_SERVICE}'

    settings = load_text(tmp_path, text, {"MRQ_NODE": ""}).supervisor

    assert settings.node == "from-file"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRQ_NODE", "from-os-environ")
    path = write_config(tmp_path, MINIMAL_SERVICE)

    assert load_config(path).supervisor.node == "from-os-environ"
    assert parse_config(MINIMAL_SERVICE, path).supervisor.node == "from-os-environ"


def test_env_override_error_names_variable(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, MINIMAL_SERVICE, r"supervisor\.node \(from MRQ_NODE\)", {"MRQ_NODE": "Bad.Name"}
    )

    assert '"Bad.Name"' in message
    assert "environment variable MRQ_NODE" in message


def test_env_overrides_cover_documented_variables() -> None:
    assert dict(ENV_OVERRIDES) == {
        "MRQ_NODE": "node",
        "MRQ_BROKER_URL": "broker",
        "MRQ_EXCHANGE": "exchange",
        "MRQ_STATE_DIR": "state_dir",
        "MRQ_CLUSTER_KEY": "cluster_key",
        "MRQ_DASHBOARD": "dashboard",
    }


def test_dashboard_variable_turns_it_off(tmp_path: Path) -> None:
    config = parse_config('[services.a]\ncommand = ["true"]\n', tmp_path / "s.toml", {"MRQ_DASHBOARD": "off"})
    assert config.supervisor.dashboard is None


# --- errors: files and syntax ------------------------------------------------------------


def test_missing_file_names_path_and_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(Path("supervisor.toml"), env={})

    message = str(caught.value)
    assert str(tmp_path / "supervisor.toml") in message
    assert "-c PATH" in message


def test_folder_instead_of_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="found a folder") as caught:
        load_config(tmp_path, env={})

    assert "-c PATH" in str(caught.value)


def test_toml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    text = '[supervisor]\nnode = "web-1"\nreplicas 2\n'

    message = config_error(tmp_path, text, "invalid TOML")

    path = tmp_path / "supervisor.toml"
    assert f"{path}:3:10: invalid TOML: expected '='" in message
    assert "replicas 2" in message
    assert "\n             ^" in message


def test_toml_error_at_end_of_file(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'node = "unterminated', "invalid TOML")

    assert f"{tmp_path / 'supervisor.toml'}:1:21:" in message
    assert "at the end of the file" in message


def test_non_utf8_file_reports_position(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_bytes(b'[supervisor]\nnode = "w\xffeb"\n')

    with pytest.raises(ConfigError, match="invalid UTF-8 byte 0xff") as caught:
        load_config(path, env={})

    assert f"{path}:2:10:" in str(caught.value)


# --- errors: unknown keys ----------------------------------------------------------------


def test_unknown_top_level_key_suggests_known(tmp_path: Path) -> None:
    message = config_error(tmp_path, f"[service.orders]\nmodule = 'x'\n{MINIMAL_SERVICE}", "service")

    assert 'service: unknown key: expected a key of the top level, found "service"' in message
    assert "Did you mean services?" in message


def test_top_level_path_key_is_unknown(tmp_path: Path) -> None:
    message = config_error(tmp_path, f'path = "/etc"\n{MINIMAL_SERVICE}', "unknown key")

    assert "path: unknown key" in message
    assert "supervisor, services" in message


def test_unknown_supervisor_key_suggests_known(tmp_path: Path) -> None:
    text = f"[supervisor]\nheartbeat_interval = 2\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.heartbeat_interval: unknown key")

    assert "expected a key of [supervisor]" in message
    assert "Did you mean heartbeat_interval_s?" in message


def test_unknown_service_key_suggests_known(tmp_path: Path) -> None:
    message = service_error(
        tmp_path, 'module = "examples.orders"\nreplica = 2', r"services\.orders\.replica: unknown key"
    )

    assert "expected a key of [services.orders]" in message
    assert "Did you mean replicas?" in message


def test_service_key_in_supervisor_table(tmp_path: Path) -> None:
    text = f"[supervisor]\nprefetch = 10\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.prefetch: unknown key")

    assert "prefetch is a key of [services.NAME] tables" in message


def test_unknown_key_control_characters_escaped(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\n"odd\\u2028key" = 1\n"odd\\u0085name" = 2'

    message = service_error(tmp_path, body, "unknown key")

    assert len(message.splitlines()) == 2
    assert 'services.orders."odd\\u2028key": unknown key' in message
    assert 'services.orders."odd\\u0085name": unknown key' in message


def test_unknown_key_without_match_lists_keys(tmp_path: Path) -> None:
    message = service_error(tmp_path, 'module = "examples.orders"\nzzz = 1', "unknown key")

    assert "The keys of [services.orders] are: module, command, python, replicas" in message


# --- errors: services --------------------------------------------------------------------


def test_module_and_command_together_rejected(tmp_path: Path) -> None:
    message = service_error(
        tmp_path,
        'module = "examples.orders"\ncommand = ["redis-server"]',
        r"services\.orders: conflicting keys",
    )

    assert "expected exactly one of module or command, found both" in message


def test_neither_module_nor_command_rejected(tmp_path: Path) -> None:
    message = service_error(tmp_path, "replicas = 1", r"services\.orders: missing key")

    assert "expected exactly one of module or command, found neither" in message


def test_command_string_suggests_array(tmp_path: Path) -> None:
    message = service_error(
        tmp_path, "command = \"python -m http.server '8000'\"", r"services\.orders\.command"
    )

    assert "expected a non-empty array of strings" in message
    assert "found \"python -m http.server '8000'\" (a string)" in message
    assert 'command = ["python", "-m", "http.server", "8000"]' in message


@pytest.mark.parametrize(
    ("command", "found"),
    [("[]", "[] (an array)"), ('["a", 1]', "1 (an integer) at index 1"), ('[""]', "empty program")],
)
def test_bad_command_array_rejected(tmp_path: Path, command: str, found: str) -> None:
    message = service_error(tmp_path, f"command = {command}", r"services\.orders\.command")

    assert found in message


def test_python_with_command_rejected(tmp_path: Path) -> None:
    body = f'command = ["redis-server"]\npython = "{sys.executable}"'

    message = service_error(tmp_path, body, r"services\.orders\.python")

    assert "expected python only with module" in message


def test_missing_python_interpreter_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\npython = "no-such-python-3.99"'

    message = service_error(tmp_path, body, r"services\.orders\.python")

    assert '"no-such-python-3.99", which is not on PATH' in message


@pytest.mark.parametrize(
    ("module", "fix"),
    [
        ('"examples/orders.py"', 'module = "examples.orders"'),
        ('"1orders"', 'module = "examples.orders"'),
        ('"examples.class"', 'module = "examples.orders"'),
        ('"examples.orders:"', 'module = "examples.orders"'),
        ('"examples..orders"', 'module = "examples.orders"'),
        ("5", 'module = "examples.orders"'),
    ],
)
def test_bad_module_name_rejected(tmp_path: Path, module: str, fix: str) -> None:
    message = service_error(tmp_path, f"module = {module}", r"services\.orders\.module")

    assert 'expected a dotted module name, "package.module" or "package.module:Name"' in message
    assert fix in message


def test_bad_restart_value_suggests_choice(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nrestart = "on_failure"'

    message = service_error(tmp_path, body, r"services\.orders\.restart")

    assert 'expected one of "always", "on-failure", "never", found "on_failure"' in message
    assert 'Did you mean restart = "on-failure"?' in message


SERVICE_DURATIONS = [
    "restart_window_s",
    "backoff_initial_s",
    "backoff_max_s",
    "stable_after_s",
    "stop_timeout_s",
    "max_memory_grace_s",
]
SUPERVISOR_DURATIONS = ["start_timeout_s", "command_max_age_s"]


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "inf", "nan"])
@pytest.mark.parametrize("key", SERVICE_DURATIONS)
def test_service_duration_must_be_positive(tmp_path: Path, key: str, value: str) -> None:
    body = f'module = "examples.orders"\n{key} = {value}'

    message = service_error(tmp_path, body, rf"services\.orders\.{key}: invalid value")

    assert "expected a number of seconds, greater than 0" in message
    assert f"found {value} (" in message


@pytest.mark.parametrize("value", ["0", "-2"])
@pytest.mark.parametrize("key", SUPERVISOR_DURATIONS)
def test_supervisor_duration_must_be_positive(tmp_path: Path, key: str, value: str) -> None:
    text = f"[supervisor]\n{key} = {value}\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, rf"supervisor\.{key}: invalid value")

    assert "expected a number of seconds, greater than 0" in message


def test_heartbeat_interval_has_minimum(tmp_path: Path) -> None:
    text = f"[supervisor]\nheartbeat_interval_s = 0.01\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.heartbeat_interval_s")

    assert "expected a number of seconds, at least 0.05, found 0.01 (a float)" in message


def test_duration_given_as_string_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nstop_timeout_s = "10"'

    message = service_error(tmp_path, body, r"services\.orders\.stop_timeout_s")

    assert 'found "10" (a string)' in message
    assert "Remove the quotes: stop_timeout_s = 10.0." in message


def test_backoff_max_below_initial_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nbackoff_initial_s = 5\nbackoff_max_s = 1'

    message = service_error(tmp_path, body, r"services\.orders\.backoff_max_s")

    assert "expected a number of seconds of at least backoff_initial_s (5), found 1" in message


def test_backoff_max_below_default_initial_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nbackoff_max_s = 0.1'

    message = service_error(tmp_path, body, r"services\.orders\.backoff_max_s")

    assert "at least backoff_initial_s (0.5), found 0.1" in message


@pytest.mark.parametrize(
    ("value", "found", "fix"),
    [
        ('"2"', '"2" (a string)', "Remove the quotes: replicas = 2."),
        ("2.0", "2.0 (a float)", "Write it as an integer: replicas = 2."),
        ("2.5", "2.5 (a float)", "replicas = 1 (the default)"),
        ("true", "true (a boolean)", "replicas = 1 (the default)"),
        ("-1", "-1 (an integer)", "replicas = 1 (the default)"),
        ("257", "257 (an integer)", "replicas = 1 (the default)"),
    ],
)
def test_replicas_must_be_integer_in_range(tmp_path: Path, value: str, found: str, fix: str) -> None:
    body = f'module = "examples.orders"\nreplicas = {value}'

    message = service_error(tmp_path, body, r"services\.orders\.replicas: invalid value")

    assert f"expected an integer from 0 to 256, found {found}" in message
    assert fix in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("prefetch", "0", "an integer from 1 to 65535"),
        ("prefetch", "65536", "an integer from 1 to 65535"),
        ("concurrency", "0", "an integer, at least 1"),
        ("max_restarts", "-1", "an integer, at least 0"),
        ("max_memory_mb", "0", "an integer, greater than 0"),
        ("heartbeat", '"yes"', "true or false"),
        ("queue_type", '"stream"', 'one of "classic", "quorum"'),
    ],
)
def test_service_value_out_of_range_rejected(tmp_path: Path, key: str, value: str, expected: str) -> None:
    body = f'module = "examples.orders"\n{key} = {value}'

    message = service_error(tmp_path, body, rf"services\.orders\.{key}: invalid value")

    assert f"expected {expected}, found {value} (" in message


def test_env_value_must_be_string(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nenv = { PORT = 8080, DEBUG = true, RATIO = 0.5 }'

    message = service_error(tmp_path, body, r"services\.orders\.env\.PORT: invalid value")

    assert 'found 8080 (an integer). Write it as PORT = "8080".' in message
    assert "services.orders.env.DEBUG: invalid value" in message
    assert 'Write it as DEBUG = "true".' in message
    assert 'Write it as RATIO = "0.5".' in message


def test_env_name_with_equals_sign_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\nenv = { "A=B" = "x" }'

    message = service_error(tmp_path, body, r'services\.orders\.env\."A=B": invalid environment')

    assert 'without "=" or NUL characters, found "A=B"' in message


def test_missing_cwd_rejected(tmp_path: Path) -> None:
    body = 'module = "examples.orders"\ncwd = "no-such-folder"'

    message = service_error(tmp_path, body, r"services\.orders\.cwd: invalid value")

    assert f'expected an existing folder, found "{tmp_path.resolve() / "no-such-folder"}"' in message


def test_invalid_service_name_suggests_lower_case(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, '[services.Orders]\nmodule = "examples.orders"\n', r"services\.Orders: invalid"
    )

    assert 'found "Orders" (a string)' in message
    assert "Rename the table to [services.orders]." in message


def test_service_that_is_not_a_table_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, f"{MINIMAL_SERVICE}[services]\nbilling = 5\n", "billing")

    assert "services.billing: invalid value: expected a table [services.billing]" in message


@pytest.mark.parametrize(
    ("text", "found"),
    [("[supervisor]\n", "found none"), ("[services]\n", "found an empty [services] table")],
)
def test_no_services_rejected(tmp_path: Path, text: str, found: str) -> None:
    message = config_error(tmp_path, text, "services: no services")

    assert "expected at least one [services.NAME] table" in message
    assert found in message


# --- errors: [supervisor] ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "detail"),
    [
        ('"Web.1"', 'Use node = "web-1"'),
        ('"-web"', 'found "-web"'),
        ('"' + "a" * 64 + '"', "1 to 63 characters"),
        ("1", "found 1 (an integer)"),
        ('"all"', "reserved because control commands use it to address every node"),
    ],
)
def test_bad_node_name_rejected(tmp_path: Path, node: str, detail: str) -> None:
    text = f"[supervisor]\nnode = {node}\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.node: invalid value")

    assert 'expected a node name of 1 to 63 characters from a-z, 0-9, "_" and "-"' in message
    assert detail in message


@pytest.mark.parametrize(
    ("broker", "found"),
    [
        (f'"http://app:{BROKER_PASSWORD}@127.0.0.1/"', "with scheme http"),
        ('"127.0.0.1:5672"', "with scheme none"),
        ('"amqp://"', "with no host"),
        ('"amqp://127.0.0.1:99999/"', "not a valid URL"),
        ('"Auto"', "with scheme none"),
    ],
)
def test_bad_broker_rejected(tmp_path: Path, broker: str, found: str) -> None:
    text = f"[supervisor]\nbroker = {broker}\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.broker: invalid value")

    assert '"auto" or an AMQP URL that starts with amqp:// or amqps://' in message
    assert found in message
    assert BROKER_PASSWORD not in message


@pytest.mark.parametrize("exchange", ['""', '"amq.topic"', '"my exchange"', '"' + "x" * 120 + '"'])
def test_bad_exchange_rejected(tmp_path: Path, exchange: str) -> None:
    text = f"[supervisor]\nexchange = {exchange}\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.exchange: invalid value")

    assert "expected an exchange name of 1 to 119 characters" in message


@pytest.mark.parametrize(
    "dashboard", ['"localhost"', '"127.0.0.1:0"', '"127.0.0.1:70000"', '":7070"', '"::1:7070"', "true"]
)
def test_bad_dashboard_rejected(tmp_path: Path, dashboard: str) -> None:
    text = f"[supervisor]\ndashboard = {dashboard}\n{MINIMAL_SERVICE}"

    message = config_error(tmp_path, text, r"supervisor\.dashboard: invalid value")

    assert 'expected "HOST:PORT" with a port from 1 to 65535, or "off" or false' in message


def test_cluster_key_and_key_file_together_rejected(tmp_path: Path) -> None:
    (tmp_path / "cluster.key").write_text(CLUSTER_KEY)
    text = f'[supervisor]\ncluster_key = "{CLUSTER_KEY}"\ncluster_key_file = "cluster.key"\n'

    message = config_error(tmp_path, text + MINIMAL_SERVICE, r"supervisor\.cluster_key_file")

    assert "conflicting keys: expected either cluster_key or cluster_key_file, found both" in message
    assert CLUSTER_KEY not in message


def test_unknown_home_folder_rejected(tmp_path: Path) -> None:
    text = f'[supervisor]\nstate_dir = "~no-such-user-mrq/state"\n{MINIMAL_SERVICE}'

    message = config_error(tmp_path, text, r"supervisor\.state_dir: invalid value")

    assert 'expected a path that can be resolved, found "~no-such-user-mrq/state"' in message


def test_missing_cluster_key_file_rejected(tmp_path: Path) -> None:
    text = f'[supervisor]\ncluster_key_file = "missing.key"\n{MINIMAL_SERVICE}'

    message = config_error(tmp_path, text, r"supervisor\.cluster_key_file: invalid value")

    assert f'found "{tmp_path.resolve() / "missing.key"}"' in message


def test_short_cluster_key_rejected_hidden(tmp_path: Path) -> None:
    text = f'[supervisor]\ncluster_key = "tooshort-pw"\n{MINIMAL_SERVICE}'

    message = config_error(tmp_path, text, r"supervisor\.cluster_key: invalid value")

    assert "expected a string of at least 16 characters" in message
    assert "found a hidden string of 11 characters" in message
    assert "tooshort-pw" not in message


def test_log_level_suggests_lower_case(tmp_path: Path) -> None:
    text = f'[supervisor]\nlog_level = "INFO"\n{MINIMAL_SERVICE}'

    message = config_error(tmp_path, text, r"supervisor\.log_level: invalid value")

    assert 'Did you mean log_level = "info"?' in message


def test_supervisor_that_is_not_a_table_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, f'supervisor = "x"\n{MINIMAL_SERVICE}', "supervisor")

    assert "supervisor: invalid value: expected a table [supervisor]" in message


# --- several errors, secrets -------------------------------------------------------------


def test_all_errors_reported_one_per_line(tmp_path: Path) -> None:
    text = """
[supervisor]
node = "all"
heartbeat_misses = 0

[services.orders]
module = "examples.orders"
command = ["x"]
replicas = "two"

[services.billing]
restart = "sometimes"
"""
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError, match=r"supervisor\.node") as caught:
        load_config(path, env={})

    lines = str(caught.value).splitlines()
    keys = [problem.key for problem in caught.value.problems]
    assert len(lines) == 6
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert keys == [
        "supervisor.node",
        "supervisor.heartbeat_misses",
        "services.orders",
        "services.orders.replicas",
        "services.billing",
        "services.billing.restart",
    ]


def test_secrets_absent_from_config_repr(tmp_path: Path) -> None:
    text = f"""
[supervisor]
broker = "amqp://app:{BROKER_PASSWORD}@127.0.0.1:5672/"
cluster_key = "{CLUSTER_KEY}"

[services.orders]
module = "examples.orders"
env = {{ DB_PASSWORD = "db-password-value" }}
"""
    config = load_text(tmp_path, text)

    assert config.supervisor.cluster_key is not None
    assert config.supervisor.cluster_key.get_secret_value() == CLUSTER_KEY
    for rendered in (str(config), repr(config), repr(config.supervisor), config.model_dump_json()):
        assert CLUSTER_KEY not in rendered
    for rendered in (str(config), repr(config), repr(config.supervisor)):
        assert BROKER_PASSWORD not in rendered
        assert "db-password-value" not in rendered
    assert "amqp://app:***@127.0.0.1:5672/" in repr(config.supervisor)


def test_secrets_absent_from_error_and_traceback(tmp_path: Path) -> None:
    text = f"""
[supervisor]
broker = "amqp://app:{BROKER_PASSWORD}@127.0.0.1:5672/"
cluster_key = "{CLUSTER_KEY}"
log_level = "loud"

[services.orders]
module = "examples.orders"
replicas = -1
"""
    path = write_config(tmp_path, text)
    env = {"MRQ_CLUSTER_KEY": "short-env-key"}

    with pytest.raises(ConfigError, match=r"supervisor\.cluster_key \(from MRQ_CLUSTER_KEY\)") as caught:
        load_config(path, env=env)

    rendered = "".join(traceback.format_exception(caught.value))
    assert "short-env-key" not in rendered
    assert CLUSTER_KEY not in rendered
    assert BROKER_PASSWORD not in rendered


# --- fingerprint -------------------------------------------------------------------------


def orders_fingerprint(folder: Path, body: str) -> str:
    config = load_text(folder, f"[services.orders]\n{body}\n")
    return config.services["orders"].fingerprint()


def test_fingerprint_ignores_key_order(tmp_path: Path) -> None:
    first = orders_fingerprint(tmp_path, 'module = "examples.orders"\nenv = { A = "1", B = "2" }')
    second = orders_fingerprint(tmp_path, 'env = { B = "2", A = "1" }\nmodule = "examples.orders"')

    assert first == second
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_fingerprint_ignores_replicas(tmp_path: Path) -> None:
    one = orders_fingerprint(tmp_path, 'module = "examples.orders"\nreplicas = 1')
    five = orders_fingerprint(tmp_path, 'module = "examples.orders"\nreplicas = 5')

    assert one == five


@pytest.mark.parametrize(
    "change",
    ['env = { A = "2" }', "stop_timeout_s = 11", 'restart = "never"', "prefetch = 1"],
)
def test_fingerprint_changes_with_settings(tmp_path: Path, change: str) -> None:
    base = orders_fingerprint(tmp_path, 'module = "examples.orders"')
    changed = orders_fingerprint(tmp_path, f'module = "examples.orders"\n{change}')

    assert changed != base


def test_fingerprint_changes_with_module(tmp_path: Path) -> None:
    base = orders_fingerprint(tmp_path, 'module = "examples.orders"')
    other_module = orders_fingerprint(tmp_path, 'module = "examples.other"')

    assert other_module != base


def test_service_config_in_code_uses_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    service = ServiceConfig.model_validate({"command": ["sleep", "1"]})

    assert service.cwd == tmp_path.resolve()
    assert service.kind == "program"
    assert service.heartbeat is False


# --- any TOML value ----------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """Render a generated value as TOML source."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, date):
        return value.isoformat()
    return repr(value)


SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.dates()
)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
SUPERVISOR_KEYS = sorted(
    [*ENV_OVERRIDES.values(), "heartbeat_interval_s", "dashboard", "cluster_key_file", "log_level"]
)
SERVICE_KEYS = ["module", "command", "python", "replicas", "restart", "env", "cwd", "heartbeat"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    supervisor_values=st.dictionaries(st.sampled_from(SUPERVISOR_KEYS), VALUES, max_size=3),
    service_values=st.dictionaries(st.sampled_from(SERVICE_KEYS), VALUES, max_size=3),
)
def test_any_value_loads_or_raises_config_error(
    tmp_path: Path, supervisor_values: dict[str, Any], service_values: dict[str, Any]
) -> None:
    lines = ["[supervisor]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in supervisor_values.items()]
    lines += ["[services.orders]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in service_values.items()]
    text = "\n".join(lines) + "\n"

    error: ConfigError | None = None
    try:
        config = parse_config(text, tmp_path / "supervisor.toml", env={})
    except ConfigError as exc:
        error = exc
    if error is None:
        assert config.services["orders"].kind in ("python", "program")
        return

    # Every line names the file, except the indented source excerpt of a TOML syntax error.
    problem_lines = [line for line in str(error).splitlines() if not line.startswith("    ")]
    assert problem_lines
    assert all(line.startswith(str(tmp_path / "supervisor.toml")) for line in problem_lines)
