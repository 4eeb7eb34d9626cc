"""The CLI against two running supervisors (nodes alpha and beta) on one broker and exchange.

The two nodes start once for this module. Tests that change an instance put it
back as they found it, so they do not depend on their order.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from test_control_kit import (
    SupervisorProcess,
    instance_row,
    interrupt,
    program_service,
    publish_raw,
    python_service,
    run_cli,
    spawn_cli,
    status_rows,
    supervisors,
    vhost_url,
    wait_for_file_text,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(180)


@dataclass
class Cluster:
    alpha: SupervisorProcess
    beta: SupervisorProcess
    echo: str  # a Python service with 2 instances on alpha
    sleeper: str  # a program service on alpha
    remote: str  # a Python service on beta
    exchange: str
    broker_url: str
    alpha_name: str
    beta_name: str

    @property
    def config(self) -> Path:
        """The CLI's config: alpha's, so alpha is "this host's node"."""
        return self.alpha.config


@pytest.fixture(scope="module")
def cluster(test_vhost: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    suffix = os.urandom(3).hex()
    url, exchange = vhost_url(test_vhost), f"ctl{suffix}"
    echo, sleeper, remote = f"echo{suffix}", f"sleeper{suffix}", f"remote{suffix}"
    alpha_dir = tmp_path_factory.mktemp("alpha")
    beta_dir = tmp_path_factory.mktemp("beta")
    alpha = SupervisorProcess(
        write_config(
            alpha_dir,
            node=f"alpha{suffix}",
            broker_url=url,
            exchange=exchange,
            services={echo: python_service(alpha_dir, 2), sleeper: program_service()},
        )
    )
    beta = SupervisorProcess(
        write_config(
            beta_dir,
            node=f"beta{suffix}",
            broker_url=url,
            exchange=exchange,
            services={remote: python_service(beta_dir)},
        )
    )
    cleanup = supervisors(alpha, beta)
    next(cleanup)
    try:
        alpha.start()
        beta.start()
        alpha.wait_for_log("supervisor ready")
        beta.wait_for_log("supervisor ready")
        both = {f"alpha{suffix}", f"beta{suffix}"}
        wait_until(lambda: {row["node"] for row in status_rows(alpha.config)} == both, timeout_s=30)
        yield Cluster(alpha, beta, echo, sleeper, remote, exchange, url, f"alpha{suffix}", f"beta{suffix}")
    finally:
        with pytest.raises(StopIteration):
            next(cleanup)


def test_status_json_lists_both_nodes(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "status", "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["nodes"]) == {cluster.alpha_name, cluster.beta_name}
    rows = [row for node in document["nodes"].values() for row in node["instances"]]
    services = sorted((row["node"], row["service"], row["instance"]) for row in rows)
    assert services == sorted(
        [
            (cluster.alpha_name, cluster.echo, 0),
            (cluster.alpha_name, cluster.echo, 1),
            (cluster.alpha_name, cluster.sleeper, 0),
            (cluster.beta_name, cluster.remote, 0),
        ]
    )
    assert all(row["state"] == "running" for row in rows)
    assert all(isinstance(row["pid"], int) for row in rows)
    assert document["missing"] == []


def test_status_table_shows_every_instance(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "status")

    assert result.returncode == 0, result.stderr
    for name in (cluster.echo, cluster.sleeper, cluster.remote, cluster.alpha_name, cluster.beta_name):
        assert name in result.stdout, result.stdout
    assert "running" in result.stdout
    assert result.stdout.count("\n") >= 8  # title, header, rules and 4 rows


def test_status_filter_and_node_option(cluster: Cluster) -> None:
    rows = status_rows(cluster.config, cluster.remote)
    assert [(r["node"], r["service"]) for r in rows] == [(cluster.beta_name, cluster.remote)]

    rows = status_rows(cluster.config, "--node", cluster.beta_name)
    assert {r["node"] for r in rows} == {cluster.beta_name}


def test_status_unknown_service_exits_1(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "status", "nosuchservice")

    assert result.returncode == 1
    assert "service 'nosuchservice' not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("scale", "x", "notanumber"),
        ("stop",),
        ("status", "--no-such-option"),
        ("logs",),
    ],
)
def test_usage_errors_exit_2(cluster: Cluster, args: tuple[str, ...]) -> None:
    result = run_cli(cluster.config, *args)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr


def test_stop_and_start_program_instance(cluster: Cluster) -> None:
    before = instance_row(cluster.config, cluster.sleeper, 0)

    stopped = run_cli(cluster.config, "stop", f"{cluster.sleeper}:0")
    assert stopped.returncode == 0, stopped.stderr
    assert f"{cluster.sleeper}:0  stopped" in stopped.stdout
    row = instance_row(cluster.config, cluster.sleeper, 0)
    assert row["state"] == "stopped"
    assert row["pid"] is None

    started = run_cli(cluster.config, "start", cluster.sleeper)
    assert started.returncode == 0, started.stderr
    row = instance_row(cluster.config, cluster.sleeper, 0)
    assert row["state"] == "running"
    assert row["pid"] not in (None, before["pid"])


def test_stop_unknown_target_exits_1(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "stop", "nosuchservice", f"{cluster.echo}:7")

    assert result.returncode == 1
    assert "nosuchservice not found" in result.stderr
    assert f"{cluster.echo}:7 not found" in result.stderr
    assert all(r["state"] == "running" for r in status_rows(cluster.config))


def test_restart_of_two_replicas_is_rolling(cluster: Cluster) -> None:
    before = {r["instance"]: r["pid"] for r in status_rows(cluster.config, cluster.echo)}
    last_id = _last_event_id(cluster)

    result = run_cli(cluster.config, "restart", cluster.echo)

    assert result.returncode == 0, result.stderr
    after = {r["instance"]: r["pid"] for r in status_rows(cluster.config, cluster.echo)}
    assert set(after) == {0, 1}
    assert all(after[i] != before[i] for i in (0, 1)), (before, after)
    events = _events_since(cluster, cluster.echo, last_id)
    running = {0, 1}
    for event in events:
        if event["kind"] == "instance.exited":
            running.discard(event["instance"])
        elif event["kind"] == "instance.running":
            running.add(event["instance"])
        assert running, f"no instance of {cluster.echo} was running after event {event}"
    assert [e["kind"] for e in events].count("instance.exited") == 2


def _last_event_id(cluster: Cluster) -> int:
    result = run_cli(cluster.config, "events", "--json", "-n", "1", "--node", cluster.alpha_name)
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)["events"]
    return int(events[-1]["id"]) if events else 0


def _events_since(cluster: Cluster, service: str, last_id: int) -> list[dict[str, object]]:
    args = ("events", "--json", "-n", "200", "--service", service, "--node", cluster.alpha_name)
    result = run_cli(cluster.config, *args)
    assert result.returncode == 0, result.stderr
    return [e for e in json.loads(result.stdout)["events"] if int(e["id"]) > last_id]


def test_scale_up_and_down(cluster: Cluster) -> None:
    up = run_cli(cluster.config, "scale", cluster.echo, "3")
    assert up.returncode == 0, up.stderr
    assert "2 -> 3 instances" in up.stdout
    wait_until(lambda: len(status_rows(cluster.config, cluster.echo)) == 3)

    down = run_cli(cluster.config, "scale", cluster.echo, "2")
    assert down.returncode == 0, down.stderr
    assert "3 -> 2 instances" in down.stdout
    rows = status_rows(cluster.config, cluster.echo)
    assert sorted(r["instance"] for r in rows) == [0, 1]


def test_scale_unknown_service_exits_1(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "scale", "nosuchservice", "2")

    assert result.returncode == 1
    assert "'nosuchservice' not found" in result.stderr


def test_logs_from_local_files(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "logs", f"{cluster.echo}:0", "-n", "200")

    assert result.returncode == 0, result.stderr
    assert f"serving services={cluster.echo}" in result.stdout


def test_logs_from_remote_node_as_json(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "logs", cluster.remote, "-n", "200", "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (entry,) = document["logs"]
    assert entry["instance"] == f"{cluster.beta_name}/{cluster.remote}:0"
    assert any(f"serving services={cluster.remote}" in line for line in entry["lines"])


def test_logs_follow_remote_sees_new_lines(cluster: Cluster, tmp_path: Path) -> None:
    args = ("logs", f"{cluster.remote}:0", "-f", "-n", "0")
    follower = spawn_cli(cluster.config, *args, output=tmp_path / "f")
    try:
        wait_for_file_text(tmp_path / "f.err", "following")
        restarted = run_cli(cluster.config, "restart", cluster.remote)
        assert restarted.returncode == 0, restarted.stderr
        pid = instance_row(cluster.config, cluster.remote, 0)["pid"]
        wait_for_file_text(tmp_path / "f.out", f"pid={pid}", timeout_s=30)
    finally:
        interrupt(follower)


def test_events_follow_sees_kill_and_restart(cluster: Cluster, tmp_path: Path) -> None:
    follower = spawn_cli(cluster.config, "events", "-f", "--json", output=tmp_path / "e")
    try:
        wait_for_file_text(tmp_path / "e.err", "following")
        pid = instance_row(cluster.config, cluster.sleeper, 0)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for_file_text(tmp_path / "e.out", '"instance.running"', timeout_s=30)
    finally:
        assert interrupt(follower) == 0
    events = [json.loads(line) for line in (tmp_path / "e.out").read_text().splitlines()]
    mine = [e for e in events if e["service"] == cluster.sleeper]
    kinds = [e["kind"] for e in mine]
    assert kinds.index("instance.exited") < kinds.index("instance.running")
    exited = next(e for e in mine if e["kind"] == "instance.exited")
    assert exited["data"]["signal"] == signal.SIGKILL
    assert exited["node"] == cluster.alpha_name


def test_call_prints_reply_and_round_trip(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "call", f"{cluster.echo}.echo", '{"a": [1, 2]}', "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["reply"] == {"a": [1, 2]}
    assert document["rtt_ms"] > 0

    text = run_cli(cluster.config, "call", f"{cluster.echo}.echo", "plain words")
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == "plain words"
    assert "round trip:" in text.stderr


def test_call_errors_exit_1(cluster: Cluster) -> None:
    no_route = run_cli(cluster.config, "call", "nosuchservice.echo", "{}")
    assert no_route.returncode == 1
    assert "no queue is bound to 'nosuchservice.echo'" in no_route.stderr

    failed = run_cli(cluster.config, "call", f"{cluster.echo}.fail", '"x"', "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["remote_type"] == "ValueError"
    assert "failed on purpose: x" in failed.stderr


def test_send_reaches_route(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "send", f"{cluster.echo}.echo", "{}")
    assert result.returncode == 0, result.stderr
    assert f"sent to {cluster.echo}.echo" in result.stdout

    missing = run_cli(cluster.config, "send", "nosuchservice", "{}")
    assert missing.returncode == 1


def test_ping_every_python_service(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "ping", "--json")

    assert result.returncode == 0, result.stderr
    pings = json.loads(result.stdout)["pings"]
    assert {(p["node"], p["service"]) for p in pings} == {
        (cluster.alpha_name, cluster.echo),
        (cluster.beta_name, cluster.remote),
    }
    assert all(p["ok"] and p["rtt_ms"] > 0 for p in pings)

    program = run_cli(cluster.config, "ping", cluster.sleeper)
    assert program.returncode == 1
    assert "is a program" in program.stderr


def test_reload_without_changes(cluster: Cluster) -> None:
    result = run_cli(cluster.config, "reload")

    assert result.returncode == 0, result.stderr
    assert f"{cluster.alpha_name}  reloaded  nothing changed" in result.stdout
    assert f"{cluster.beta_name}  reloaded  nothing changed" in result.stdout


def test_events_follow_rejects_forged_event(cluster: Cluster, tmp_path: Path) -> None:
    follower = spawn_cli(cluster.config, "events", "-f", "--json", output=tmp_path / "e")
    try:
        wait_for_file_text(tmp_path / "e.err", "following")
        _publish_forged_event(cluster)
        wait_for_file_text(tmp_path / "e.err", "event rejected", timeout_s=30)
    finally:
        interrupt(follower)
    assert "forged" not in (tmp_path / "e.out").read_text()


def _publish_forged_event(cluster: Cluster) -> None:
    from sdk.wire import Event

    event = Event(id="x-1", time=time.time(), node="forged", kind="instance.fatal", service="forged")
    anyio.run(
        publish_raw,
        cluster.broker_url,
        f"{cluster.exchange}.control",
        "event.forged.instance.fatal",
        event.to_json(),
        {"x-mrq-signature": "0" * 64},
    )
