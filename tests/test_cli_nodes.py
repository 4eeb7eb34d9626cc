"""Nodes that stop, hang, or collide: the CLI does not hang and reports which node sent no reply."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_control_kit import (
    CLUSTER_KEY,
    SupervisorProcess,
    program_service,
    run_cli,
    status_rows,
    wait_until,
    write_config,
)

from supervisor.keys import KEY_FILE_NAME
from supervisor.registry import registry_path

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def make_node(broker_url: str, unique: str, tmp_path: Path) -> Iterator[object]:
    """Return a factory of supervisors on one exchange; all are stopped when the test ends."""
    started: list[SupervisorProcess] = []

    def make(name: str, *, folder: str | None = None, key: str | None = CLUSTER_KEY) -> SupervisorProcess:
        config = write_config(
            tmp_path / (folder or name),
            node=f"{name}{unique}",
            broker_url=broker_url,
            exchange=f"nodes{unique}",
            services={f"sleep{name}{unique}": program_service()},
            key=key,
        )
        process = SupervisorProcess(config)
        started.append(process)
        return process

    yield make
    leftovers = [pid for process in started for pid in process.stop()]
    assert leftovers == [], f"instances left running after their supervisor stopped: {leftovers}"


def _nodes_of(config: Path) -> set[str]:
    return {row["node"] for row in status_rows(config)}


def test_hung_node_reported_as_not_answering(make_node: object, unique: str) -> None:
    alpha, beta = make_node("alpha"), make_node("beta")  # type: ignore[operator]
    alpha.start_and_wait()
    beta.start_and_wait()
    wait_until(lambda: _nodes_of(alpha.config) == {f"alpha{unique}", f"beta{unique}"}, timeout_s=30)

    os.kill(beta.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        result = run_cli(alpha.config, "status", "--json", "--timeout", "2")
        elapsed_s = time.monotonic() - began
    finally:
        os.kill(beta.pid, signal.SIGCONT)

    assert result.returncode == 1
    assert f"node beta{unique} did not answer within 2 s" in result.stderr
    document = json.loads(result.stdout)
    assert document["missing"] == [f"beta{unique}"]
    assert list(document["nodes"]) == [f"alpha{unique}"]
    assert elapsed_s < 30


def test_frozen_node_skips_expired_commands(make_node: object, unique: str) -> None:
    alpha = make_node("alpha")  # type: ignore[operator]
    alpha.start_and_wait()
    service, node = f"sleepalpha{unique}", f"alpha{unique}"
    pid = next(row["pid"] for row in status_rows(alpha.config) if row["service"] == service)

    os.kill(alpha.pid, signal.SIGSTOP)
    try:
        stopped = run_cli(alpha.config, "stop", f"{service}:0", "--node", node, "--timeout", "2")
        shutdown = run_cli(alpha.config, "shutdown", "--node", node, "--timeout", "2")
    finally:
        os.kill(alpha.pid, signal.SIGCONT)

    for result in (stopped, shutdown):
        assert result.returncode == 1
        assert f"node {node} did not answer within 2 s, and the command expired" in result.stderr
        assert "not found" not in result.stderr
    alpha.wait_for_log("command rejected reason=expired", timeout_s=30)
    # The rejection is logged before the next command is verified: give that one time too.
    time.sleep(2)
    assert alpha.popen.poll() is None, "the expired shutdown ran after SIGCONT"  # type: ignore[union-attr]
    rows = [row for row in status_rows(alpha.config) if row["service"] == service]
    assert [(row["state"], row["pid"]) for row in rows] == [("running", pid)]


def test_stopped_node_dropped_from_known(make_node: object, unique: str) -> None:
    alpha, beta = make_node("alpha"), make_node("beta")  # type: ignore[operator]
    alpha.start_and_wait()
    beta.start_and_wait()
    wait_until(lambda: _nodes_of(alpha.config) == {f"alpha{unique}", f"beta{unique}"}, timeout_s=30)

    beta.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert beta.exit_code() == 0

    everyone = run_cli(alpha.config, "status", "--json")
    assert everyone.returncode == 0, everyone.stderr
    assert list(json.loads(everyone.stdout)["nodes"]) == [f"alpha{unique}"]
    began = time.monotonic()
    named = run_cli(alpha.config, "status", "--node", f"beta{unique}")
    assert named.returncode == 1
    assert f"node 'beta{unique}' is not running" in named.stderr
    assert time.monotonic() - began < 30


def test_generated_key_used_by_local_cli(make_node: object, unique: str) -> None:
    alpha = make_node("alpha", key=None)  # type: ignore[operator]
    alpha.start_and_wait()
    key_path = alpha.state_dir / KEY_FILE_NAME
    key = key_path.read_text().strip()

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(key) >= 32
    # The CLI reads the key from the state folder, so the node replies to its signed command.
    assert _nodes_of(alpha.config) == {f"alpha{unique}"}
    wrong = run_cli(
        alpha.config, "status", "--timeout", "2", env={"MRQ_CLUSTER_KEY": "not-this-cluster-key-0123456789"}
    )
    assert wrong.returncode == 1
    assert "Traceback" not in wrong.stderr
    alpha.wait_for_log("command rejected reason=bad signature")
    instance_logs = [path.read_text(errors="replace") for path in alpha.state_dir.rglob("*.log")]
    assert instance_logs, "the instance wrote no log file"
    for text in (alpha.log(), alpha.stdout_path.read_text(), wrong.stdout, wrong.stderr, *instance_logs):
        assert key not in text


def test_no_supervisor_running_exits_1(make_node: object) -> None:
    alpha = make_node("alpha")  # type: ignore[operator]

    result = run_cli(alpha.config, "status")

    assert result.returncode == 1
    assert "no supervisor is running on this broker" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_node_name_refused(make_node: object, unique: str) -> None:
    first = make_node("alpha")  # type: ignore[operator]
    first.start_and_wait()
    second = make_node("alpha", folder="alpha-again")  # type: ignore[operator]

    second.start()
    code = second.exit_code(60)

    assert code == 1
    log = second.log()
    assert f"another supervisor already runs as node 'alpha{unique}'" in log
    assert f"pid {first.pid}" in log
    assert "MRQ_NODE" in log
    assert second.children() == []
    assert first.popen.poll() is None  # type: ignore[union-attr]


def test_shutdown_one_node(make_node: object, unique: str) -> None:
    alpha = make_node("alpha")  # type: ignore[operator]
    alpha.start_and_wait()

    unconfirmed = run_cli(alpha.config, "shutdown")
    assert unconfirmed.returncode == 1
    assert "not confirmed" in unconfirmed.stderr
    assert alpha.popen.poll() is None  # type: ignore[union-attr]

    result = run_cli(alpha.config, "shutdown", "--node", f"alpha{unique}")
    assert result.returncode == 0, result.stderr
    assert f"alpha{unique}  stopping" in result.stdout
    assert alpha.exit_code() == 0
    assert alpha.children() == []


def test_peers_survive_a_restart(make_node: object, unique: str) -> None:
    alpha, beta = make_node("alpha"), make_node("beta")  # type: ignore[operator]
    alpha.start_and_wait()
    beta.start_and_wait()
    wait_until(lambda: _nodes_of(alpha.config) == {f"alpha{unique}", f"beta{unique}"}, timeout_s=30)
    beta.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    beta.popen.wait(10)  # type: ignore[union-attr]
    assert beta.stop() != []  # the killed supervisor left its instance; stop() killed it

    alpha.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert alpha.exit_code() == 0
    peers = json.loads(_meta(alpha.state_dir, "peers"))
    assert f"beta{unique}" in {peer["node"] for peer in peers}

    alpha.start_and_wait()
    result = run_cli(alpha.config, "status", "--timeout", "1")
    assert result.returncode == 1
    assert f"node beta{unique} did not answer within 1 s" in result.stderr


def _meta(state_dir: Path, key: str) -> str:
    connection = sqlite3.connect(f"file:{registry_path(state_dir)}?mode=ro", uri=True)
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        connection.close()
    assert row is not None, f"no meta key {key!r} in {state_dir}"
    return str(row[0])
