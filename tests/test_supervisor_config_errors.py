"""`mrq-supervisor start` with a wrong supervisor.toml exits at once with a message that helps.

Each message names the file, the key path and the expected form. Nothing starts: the
state folder is not even created. A state folder, registry or key file that cannot be
used ends the start with one line that names what failed and what to do, not a traceback.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from supkit import SUPERVISOR

# The CLI took 0.4-1 s on a loaded 2-core VM, so a longer run means it tried to start.
EXIT_LIMIT_S = 15.0

# Each case: lines added to [supervisor], the [services] part, and fragments of the message.
CASES = {
    "unknown key": (
        "heartbeat_interval = 1\n",
        '[services.a]\nmodule = "m"\n',
        ["supervisor.heartbeat_interval", "unknown key", "Did you mean heartbeat_interval_s?"],
    ),
    "module and command": (
        "",
        '[services.a]\nmodule = "m"\ncommand = ["sh"]\n',
        ["services.a", "expected exactly one of module or command", "found both"],
    ),
    "bad restart value": (
        "",
        '[services.a]\nmodule = "m"\nrestart = "sometimes"\n',
        ["services.a.restart", 'expected one of "always", "on-failure", "never"', '"sometimes"'],
    ),
    "negative duration": (
        "",
        '[services.a]\nmodule = "m"\nstop_timeout_s = -1\n',
        ["services.a.stop_timeout_s", "greater than 0", "found -1"],
    ),
    "replicas not an int": (
        "",
        '[services.a]\nmodule = "m"\nreplicas = 1.5\n',
        ["services.a.replicas", "expected an integer from 0 to 256", "found 1.5 (a float)"],
    ),
    "env value not a string": (
        "",
        '[services.a]\nmodule = "m"\nenv = { PORT = 8080 }\n',
        ["services.a.env.PORT", "expected a string", 'PORT = "8080"'],
    ),
    "bad node name": (
        'node = "Bad Node!"\n',
        '[services.a]\nmodule = "m"\n',
        ["supervisor.node", "expected a node name", '"Bad Node!"'],
    ),
    "bad broker url": (
        'broker = "http://127.0.0.1:5672/"\n',
        '[services.a]\nmodule = "m"\n',
        ["supervisor.broker", "amqp://", "scheme http"],
    ),
    "missing cwd": (
        "",
        '[services.a]\nmodule = "m"\ncwd = "no/such/folder"\n',
        ["services.a.cwd", "expected an existing folder", "does not exist"],
    ),
    "python with unknown user": (
        "",
        '[services.a]\nmodule = "m"\npython = "~nosuchuser/bin/python"\n',
        ["services.a.python", '"~nosuchuser/bin/python": Could not determine home directory'],
    ),
    "cwd name too long": (
        "",
        f'[services.a]\nmodule = "m"\ncwd = "{"c" * 300}"\n',
        ["services.a.cwd", "expected an existing folder", "File name too long"],
    ),
    "cluster_key_file name too long": (
        f'cluster_key_file = "{"k" * 300}"\n',
        '[services.a]\nmodule = "m"\n',
        ["supervisor.cluster_key_file", "File name too long"],
    ),
    "toml syntax error": (
        "",
        '[services.a]\nmodule "m"\n',
        # Line 5: two lines of [supervisor], a blank line, the table header, then the error.
        ["supervisor.toml:5:8", "invalid TOML", "expected '='"],
    ),
}


def start(config: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    result = subprocess.run(
        [SUPERVISOR, "start", "-c", str(config)],
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - began


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_config_error_exits_at_once(tmp_path: Path, case: str) -> None:
    supervisor_lines, services, fragments = CASES[case]
    config = tmp_path / "supervisor.toml"
    config.write_text(f'[supervisor]\nstate_dir = "state"\n{supervisor_lines}\n{services}')
    result, took_s = start(config)

    assert result.returncode != 0
    assert took_s < EXIT_LIMIT_S
    assert str(config) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} missing from:\n{result.stderr}"
    assert not (tmp_path / "state").exists(), "the supervisor started before rejecting the file"
    assert not (tmp_path / ".mrq").exists()


@pytest.mark.timeout(60)
def test_missing_config_file_exits_at_once(tmp_path: Path) -> None:
    config = tmp_path / "absent.toml"
    result, took_s = start(config)

    assert result.returncode != 0
    assert took_s < EXIT_LIMIT_S
    assert str(config) in result.stderr
    assert "config file not found" in result.stderr
    assert "-c PATH" in result.stderr
    assert list(tmp_path.iterdir()) == []


def start_failure(tmp_path: Path, state_dir: str) -> subprocess.CompletedProcess[str]:
    """Start a supervisor on `state_dir` and return the finished run; fail if it does not exit."""
    config = tmp_path / "supervisor.toml"
    config.write_text(
        f'[supervisor]\nstate_dir = "{state_dir}"\nbroker = "amqp://guest:guest@127.0.0.1:5672/"\n'
        'dashboard = "off"\n\n[services.sleeper]\ncommand = ["sleep", "100000"]\n'
    )
    result, took_s = start(config)
    assert took_s < EXIT_LIMIT_S
    return result


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mrq-supervisor: "), result.stderr
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} missing from:\n{last}"


@pytest.mark.timeout(60)
def test_state_dir_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder\n")

    result = start_failure(tmp_path, "state")

    assert_one_line_error(result, f"state folder {tmp_path / 'state'} not usable: it is a file", "state_dir")
    assert result.stderr.count("\n") == 1, "expected only the one line"


@pytest.mark.timeout(60)
def test_state_dir_below_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder\n")

    result = start_failure(tmp_path, "file/state")

    assert_one_line_error(result, "cannot be created: Not a directory", "state_dir")


@pytest.mark.timeout(60)
def test_corrupt_registry_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "registry.sqlite3").write_text("not a database\n")

    result = start_failure(tmp_path, "state")

    assert_one_line_error(result, "registry.sqlite3 is corrupt", "Delete it")
    assert list((tmp_path / "state").glob("*.key")) == [], "the start went on after the registry"


@pytest.mark.timeout(60)
def test_non_utf8_key_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    key_file = tmp_path / "state" / "cluster.key"
    key_file.write_bytes(b"\xff\xfe0123456789abcdef0123")
    key_file.chmod(0o600)

    result = start_failure(tmp_path, "state")

    assert_one_line_error(
        result, f"invalid cluster key file {key_file}", "byte 0xff at offset 0", "not UTF-8"
    )
