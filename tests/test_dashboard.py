"""The web dashboard over HTTP: token checks, status, actions, the route console, live streams.

One real `mrq-supervisor start` with the dashboard on a free loopback port serves
the tests of this module; httpx talks to it like the page does. `DashboardRun` and
`start_with_dashboard` are also used by tests/test_metrics.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from supkit import SupervisorRun, SupKit, supervisor_kit

# A service with a route that replies, one that fails and one that takes its time.
CONSOLE_MODULE = """
import asyncio
import os

from sdk import Service, route


class Desk(Service):
    name = os.environ["MRQ_SERVICE_NAME"]

    @route("echo")
    async def echo(self, body: object) -> object:
        return body

    @route("fail")
    async def fail(self, body: object) -> None:
        raise ValueError(f"refused {body!r}")

    @route("slow")
    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"
"""

START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
DASHBOARD_LINE = re.compile(r"Dashboard: (http://\S+)")


def free_port() -> int:
    """Return a free loopback port below Linux's ephemeral range (32768 and up).

    The supervisor binds the port a moment after this returns; an ephemeral port could
    be taken in between by an outgoing connection, such as a worker's to RabbitMQ.
    """
    for _ in range(100):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port found between 20000 and 32000")


@dataclass
class DashboardRun:
    """A running supervisor with its dashboard: the printed URL and an authenticated client."""

    kit: SupKit
    run: SupervisorRun
    url: str
    base: str
    token: str

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base, headers=headers, timeout=REQUEST_TIMEOUT_S, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            response = client.get("/api/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def instances(self) -> list[dict[str, Any]]:
        return [row for node in self.status()["nodes"] for row in node["instances"]]

    def wait_for(self, predicate: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll api/status until `predicate(instances)` holds; return the instances."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.instances()
            if predicate(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s:g} s; instances: {rows}")
            time.sleep(0.1)


def wait_for_dashboard_url(run: SupervisorRun, timeout_s: float = START_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = DASHBOARD_LINE.search(run.stdout())
        if match:
            return match.group(1)
        if run.exit_code() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(
        f"the supervisor printed no dashboard URL within {timeout_s:g} s (exit code {run.exit_code()});\n"
        f"stdout:\n{run.stdout()[-3000:]}\nstderr:\n{run.stderr()[-3000:]}"
    )


def start_in_thread(kit: SupKit) -> SupervisorRun:
    """Start the supervisor from a thread of its own: Playwright's sync API runs a loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, kit.start).result(timeout=START_TIMEOUT_S)


def start_with_dashboard(kit: SupKit, services: dict[str, dict[str, Any]], **settings: Any) -> DashboardRun:
    """Write supervisor.toml with the dashboard on a free port, start it, and wait for its URL."""
    port = free_port()
    kit.write_config(services, dashboard=f"127.0.0.1:{port}", **settings)
    run = start_in_thread(kit)
    url = wait_for_dashboard_url(run)
    match = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/\?token=([A-Za-z0-9_-]+)", url)
    assert match, f"unexpected dashboard URL {url!r}"
    return DashboardRun(kit, run, url, match.group(1), match.group(2))


def session_broker_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"


@dataclass
class Frame:
    event: str
    data: Any


class SseReader:
    """Reads the server-sent events of one streamed response, frame by frame."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        self.frames: list[Frame] = []

    def until(self, predicate: Any, timeout_s: float = 30.0) -> Frame:
        """Read frames until `predicate(frame)` holds for one, and return that frame."""
        deadline = time.monotonic() + timeout_s
        name, data = "message", []
        for line in self.lines:
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
            elif line == "" and data:
                self.frames.append(Frame(name, json.loads("\n".join(data))))
                name, data = "message", []
                if predicate(self.frames[-1]):
                    return self.frames[-1]
            if time.monotonic() > deadline:
                break
        seen = [frame.event for frame in self.frames]
        raise AssertionError(f"no matching frame within {timeout_s:g} s; frames so far: {seen}")


@pytest.fixture(scope="module")
def desk_service() -> str:
    return f"desk{os.urandom(4).hex()}"


@pytest.fixture(scope="module")
def dash(
    tmp_path_factory: pytest.TempPathFactory, test_vhost: str, desk_service: str
) -> Iterator[DashboardRun]:
    folder = tmp_path_factory.mktemp("dashboard")
    with supervisor_kit(folder, session_broker_url(test_vhost), os.urandom(4).hex()) as kit:
        kit.write_module("desk", CONSOLE_MODULE)
        yield start_with_dashboard(kit, {desk_service: {"module": "desk", "replicas": 2}})


PROTECTED = [
    ("GET", "/"),
    ("GET", "/static/app.js"),
    ("GET", "/static/style.css"),
    ("GET", "/api/status"),
    ("GET", "/api/stream"),
    ("GET", "/api/events"),
    ("GET", "/api/logs?target=x:0"),
    ("GET", "/metrics"),
    ("POST", "/api/action"),
    ("POST", "/api/send"),
    ("POST", "/api/call"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("credential", ["none", "query", "bearer", "header", "cookie"])
def test_wrong_or_missing_token_rejected(dash: DashboardRun, method: str, path: str, credential: str) -> None:
    wrong = dash.token[:-4] + "AAAA" if not dash.token.endswith("AAAA") else dash.token[:-4] + "BBBB"
    headers: dict[str, str] = {}
    if credential == "query":
        path += ("&" if "?" in path else "?") + f"token={wrong}"
    elif credential == "bearer":
        headers["Authorization"] = f"Bearer {wrong}"
    elif credential == "header":
        headers["X-MRQ-Token"] = wrong
    elif credential == "cookie":
        headers["Cookie"] = f"mrq_dashboard_{dash.base.rsplit(':', 1)[1]}={wrong}"
    with httpx.Client(base_url=dash.base, timeout=REQUEST_TIMEOUT_S) as client:
        response = client.request(method, path, headers=headers, json={} if method == "POST" else None)
    assert response.status_code == 401, response.text
    assert "token" in response.text
    assert dash.token not in response.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/api/action", "/api/send", "/api/call"])
def test_post_needs_token_in_header(dash: DashboardRun, path: str, desk_service: str) -> None:
    port = dash.base.rsplit(":", 1)[1]
    cookies = {f"mrq_dashboard_{port}": dash.token}
    body = {"route": f"{desk_service}.echo", "body": 1, "action": "start", "targets": [desk_service]}
    with httpx.Client(base_url=dash.base, timeout=REQUEST_TIMEOUT_S, cookies=cookies) as client:
        response = client.post(f"{path}?token={dash.token}", json=body)
    assert response.status_code == 401
    assert "header" in response.text


@pytest.mark.timeout(60)
def test_page_sets_strict_http_only_cookie(dash: DashboardRun) -> None:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        page = client.get(dash.url)
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert f'content="{dash.token}"' in page.text
        # Later reads work with the cookie alone, as the page's assets and streams do.
        status = client.get(f"{dash.base}/api/status")
        asset = client.get(f"{dash.base}/static/app.js")
    assert status.status_code == 200
    assert asset.status_code == 200
    assert "EventSource" in asset.text


@pytest.mark.timeout(60)
def test_status_lists_every_instance(dash: DashboardRun, desk_service: str) -> None:
    status = dash.status()
    assert status["local"] == dash.kit.node
    assert status["missing"] == []
    node = status["nodes"][0]
    assert node["node"] == dash.kit.node
    assert node["pid"] == dash.run.pid
    assert node["services"][desk_service]["replicas"] == 2
    routes = {route["queue"] for route in node["services"][desk_service]["routes"]}
    assert {f"{desk_service}.echo", f"{desk_service}.fail", f"{desk_service}.slow"} <= routes
    rows = sorted(node["instances"], key=lambda row: row["instance"])
    assert [row["instance"] for row in rows] == [0, 1]
    for row in rows:
        assert row["state"] == "running"
        assert row["pid"] > 0
        assert row["heartbeat_age_s"] is not None
        assert row["heartbeat_age_s"] < 5
        for key in ("uptime_s", "restarts", "cpu_percent", "rss_bytes", "loop_lag_ms", "last_exit_reason"):
            assert key in row


@pytest.mark.timeout(90)
def test_restart_action_replaces_process(dash: DashboardRun, desk_service: str) -> None:
    target = f"{desk_service}:1"
    before = next(row["pid"] for row in dash.instances() if row["instance"] == 1)
    with dash.client() as client:
        response = client.post("/api/action", json={"action": "restart", "targets": [target]})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is True
    assert result["node"] == dash.kit.node
    [summary] = result["result"]["instances"]
    assert summary["state"] == "running"
    assert summary["pid"] != before
    rows = dash.wait_for(lambda rows: all(r["state"] == "running" for r in rows), "running instances")
    assert next(r["pid"] for r in rows if r["instance"] == 1) == summary["pid"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "restart", "targets": ["nosuchservice"]}, r"service 'nosuchservice' not found on node"),
        ({"action": "stop", "targets": ["{service}:7"]}, r"instance \w+:7 not found on node .*2 instance"),
        ({"action": "restart", "targets": ["Bad Name"]}, r"invalid target 'Bad Name'"),
        ({"action": "scale", "service": "{service}"}, r"expected both `service` and `replicas`"),
        ({"action": "explode", "targets": ["{service}"]}, r"invalid request: action"),
        ({"action": "restart", "node": "nosuchnode", "targets": ["{service}"]}, r"nosuchnode.*not running"),
    ],
)
def test_bad_action_gives_clear_error(
    dash: DashboardRun, desk_service: str, body: dict[str, Any], message: str
) -> None:
    filled = json.loads(json.dumps(body).replace("{service}", desk_service))
    with dash.client() as client:
        response = client.post("/api/action", json=filled)
    assert response.status_code in (400, 404), response.text
    error = response.json()
    assert error["ok"] is False
    assert re.search(message, error["error"]), error["error"]


@pytest.mark.timeout(60)
def test_invalid_json_body_rejected(dash: DashboardRun) -> None:
    with dash.client() as client:
        response = client.post(
            "/api/call", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400
    assert "invalid JSON body" in response.json()["error"]


@pytest.mark.timeout(60)
def test_call_returns_reply_and_round_trip_time(dash: DashboardRun, desk_service: str) -> None:
    body = [{"item": "tea", "quantity": 2}]
    with dash.client() as client:
        response = client.post("/api/call", json={"route": f"{desk_service}.echo", "body": body})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is True
    assert result["reply"] == body
    assert 0 < result["rtt_ms"] < 30_000


@pytest.mark.timeout(60)
def test_call_failing_handler_returns_remote_error(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        response = client.post("/api/call", json={"route": f"{desk_service}.fail", "body": "tea"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is False
    assert result["error"]["type"] == "RemoteError"
    assert result["error"]["remote_type"] == "ValueError"
    assert result["error"]["remote_message"] == "refused 'tea'"


@pytest.mark.timeout(60)
def test_call_unknown_route_returns_no_route(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        response = client.post("/api/call", json={"route": f"{desk_service}.missing", "body": None})
    result = response.json()
    assert result["ok"] is False
    assert result["error"]["type"] == "NoRoute"
    assert f"{desk_service}.missing" in result["error"]["message"]


@pytest.mark.timeout(60)
def test_call_slow_route_times_out(dash: DashboardRun, desk_service: str) -> None:
    request = {"route": f"{desk_service}.slow", "body": 5, "timeout_s": 0.5}
    began = time.monotonic()
    with dash.client() as client:
        response = client.post("/api/call", json=request)
    result = response.json()
    assert result["ok"] is False
    assert result["error"]["type"] == "RpcTimeout"
    assert time.monotonic() - began < 4.5


@pytest.mark.timeout(60)
def test_call_timeout_out_of_range_rejected(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        response = client.post("/api/call", json={"route": f"{desk_service}.echo", "timeout_s": 0})
    assert response.status_code == 400
    assert "timeout_s" in response.json()["error"]


@pytest.mark.timeout(60)
def test_send_publishes_and_reports_no_route(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        sent = client.post("/api/send", json={"route": f"{desk_service}.echo", "body": {"a": 1}}).json()
        missing = client.post("/api/send", json={"route": f"{desk_service}.missing", "body": 1}).json()
        invalid = client.post("/api/send", json={"route": "not a route", "body": 1})
    assert sent["ok"] is True
    assert sent["sent"] is True
    assert missing["ok"] is False
    assert missing["error"]["type"] == "NoRoute"
    assert invalid.status_code == 400
    assert "invalid route" in invalid.json()["error"]


@pytest.mark.timeout(90)
def test_stream_sends_status_then_event(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client, client.stream("GET", "/api/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        reader = SseReader(stream)
        status = reader.until(lambda frame: frame.event == "status")
        assert status.data["nodes"][0]["node"] == dash.kit.node
        victim = next(r for r in status.data["nodes"][0]["instances"] if r["instance"] == 0)
        os.kill(victim["pid"], signal.SIGKILL)

        def is_exit(frame: Frame) -> bool:
            data = frame.data
            return frame.event == "event" and data["kind"] == "instance.exited" and data["instance"] == 0

        exited = reader.until(is_exit).data
    assert exited["service"] == desk_service
    assert exited["node"] == dash.kit.node
    assert exited["data"]["signal"] == int(signal.SIGKILL)
    dash.wait_for(lambda rows: all(r["state"] == "running" for r in rows), "recovery after SIGKILL")


@pytest.mark.timeout(60)
def test_logs_stream_starts_with_tail(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        with client.stream("GET", f"/api/logs?target={desk_service}:0&lines=5") as stream:
            first = SseReader(stream).until(lambda frame: frame.event == "lines")
        bad = client.get(f"/api/logs?target={desk_service}")
    assert first.data["reset"] is True
    assert first.data["instance"] == f"{desk_service}:0"
    assert 1 <= len(first.data["lines"]) <= 5
    assert bad.status_code == 400
    assert "SERVICE:INSTANCE" in bad.json()["error"]


@pytest.mark.timeout(60)
def test_events_history_lists_starts(dash: DashboardRun, desk_service: str) -> None:
    with dash.client() as client:
        response = client.get("/api/events", params={"limit": 50, "service": desk_service})
    events = response.json()["events"]
    kinds = {event["kind"] for event in events}
    assert {"instance.started", "instance.running"} <= kinds
    assert all(event["service"] == desk_service for event in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)


@pytest.mark.timeout(60)
def test_token_never_logged(dash: DashboardRun) -> None:
    with dash.client() as client:
        client.get(f"/?token={dash.token}")
        client.get("/nothing-here")
    log_file = dash.kit.state_dir / "supervisor.log"
    for text in (dash.run.stderr(), log_file.read_text()):
        assert "dashboard started" in text
        assert dash.token not in text


@pytest.mark.timeout(90)
def test_port_in_use_is_clear_startup_error(tmp_path: Path, broker_url: str, unique: str) -> None:
    with socket.socket() as taken, supervisor_kit(tmp_path, broker_url, unique) as kit:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        kit.write_module("desk", CONSOLE_MODULE)
        kit.write_config({kit.service("desk"): {"module": "desk"}}, dashboard=f"127.0.0.1:{port}")
        run = start_in_thread(kit)
        deadline = time.monotonic() + START_TIMEOUT_S
        while run.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.exit_code() == 1, run.stderr()[-3000:]
        last = run.stderr().strip().splitlines()[-1]
    assert f"dashboard address 127.0.0.1:{port} is already in use" in last
    assert "`dashboard` in [supervisor]" in last
    assert "Traceback" not in run.stderr()


@pytest.mark.timeout(180)
def test_other_node_shown_and_steered(tmp_path: Path, broker_url: str, unique: str) -> None:
    cluster_key = secrets.token_urlsafe(32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        supervisor_kit(tmp_path / "a", broker_url, unique) as kit_a,
        supervisor_kit(tmp_path / "b", broker_url, unique) as kit_b,
    ):
        near, far, far_node = kit_a.service("near"), kit_a.service("far"), f"m{unique}"
        kit_a.write_module("desk", CONSOLE_MODULE)
        kit_b.write_module("desk", CONSOLE_MODULE)
        dash = start_with_dashboard(kit_a, {near: {"module": "desk"}}, cluster_key=cluster_key)
        kit_b.write_config({far: {"module": "desk"}}, node=far_node, cluster_key=cluster_key)
        far_run = start_in_thread(kit_b)

        rows = dash.wait_for(
            lambda rows: any(r["node"] == far_node and r["state"] == "running" for r in rows),
            "instance of the other node",
        )
        far_pid = next(r["pid"] for r in rows if r["node"] == far_node)
        assert {r["node"] for r in rows} == {kit_a.node, far_node}

        with dash.client() as client:
            response = client.post(
                "/api/action", json={"action": "restart", "node": far_node, "targets": [f"{far}:0"]}
            )
            assert response.status_code == 200, response.text
            assert response.json()["node"] == far_node
            [summary] = response.json()["result"]["instances"]
            assert summary["pid"] != far_pid
            with client.stream("GET", "/api/logs", params={"node": far_node, "target": f"{far}:0"}) as stream:
                first = SseReader(stream).until(lambda frame: frame.event == "lines")
            assert first.data["instance"] == f"{far}:0"
            assert any("serving" in line for line in first.data["lines"])

        # A node that stops answering is listed as missing, not silently dropped.
        os.kill(far_run.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while far_node not in dash.status()["missing"]:
                assert time.monotonic() < deadline, f"node {far_node} never shown as missing"
                time.sleep(0.5)
        finally:
            os.kill(far_run.pid, signal.SIGCONT)
