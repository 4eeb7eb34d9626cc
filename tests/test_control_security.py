"""Signed commands: forged, stale, replayed, misdirected, expired, malformed, oversized ones change nothing.

The end-to-end tests publish raw messages with plain aio-pika to a real
supervisor and check the instance's pid afterwards. The property tests feed
random bytes and random JSON to `CommandVerifier.verify` and to the control
server's entry point `ControlServer.handle`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control_kit import (
    CLUSTER_KEY,
    SupervisorProcess,
    instance_row,
    program_service,
    publish_raw,
    publish_raw_many,
    run_cli,
    supervisors,
    write_config,
)

from sdk import signing
from sdk.errors import SignatureError
from sdk.wire import Command, NodeStatus, Reply, decode
from supervisor.config import load_config
from supervisor.control import COMMANDS, ControlServer, PeerBook
from supervisor.node import Node

pytestmark = pytest.mark.timeout(150)

KEY = CLUSTER_KEY.encode()
OTHER_KEY = b"another-cluster-key-0123456789"


class Target:
    def __init__(self, process: SupervisorProcess, node: str, exchange: str, url: str, service: str) -> None:
        self.process = process
        self.node = node
        self.exchange = exchange
        self.url = url
        self.service = service

    @property
    def routing_key(self) -> str:
        return f"supervisor.{self.node}"

    def command(self, name: str, args: dict[str, Any], **fields: Any) -> Command:
        """Return a command addressed to this node, with `fields` changed."""
        command = signing.make_command(name, args, sender="test", target=self.routing_key)
        return command.model_copy(update=fields)

    def send(self, body: bytes, headers: dict[str, Any] | None, wait_s: float = 1.5) -> list[bytes]:
        """Publish a raw command to the node and return the replies that came within `wait_s`."""
        return anyio.run(
            publish_raw,
            self.url,
            f"{self.exchange}.control",
            self.routing_key,
            body,
            headers,
            wait_s,
        )

    def send_all(
        self, messages: list[tuple[bytes, dict[str, Any] | None]], wait_s: float = 1.5
    ) -> list[tuple[str | None, bytes]]:
        """Publish raw commands to the node, then wait once; return the replies (correlation id, body)."""
        return anyio.run(
            publish_raw_many, self.url, f"{self.exchange}.control", self.routing_key, messages, wait_s
        )

    def pid(self) -> int:
        row = instance_row(self.process.config, self.service, 0)
        assert row["state"] == "running", row
        return int(row["pid"])

    def started_at(self) -> float:
        """Return the supervisor's start time, as `status` reports it."""
        result = run_cli(self.process.config, "status", "--json")
        assert result.returncode == 0, result.stderr
        return float(json.loads(result.stdout)["nodes"][self.node]["started_at"])


@pytest.fixture
def target(broker_url: str, unique: str, tmp_path: Path) -> Iterator[Target]:
    service = f"victim{unique}"
    config = write_config(
        tmp_path,
        node=f"guarded{unique}",
        broker_url=broker_url,
        exchange=f"sec{unique}",
        services={service: program_service()},
    )
    process = SupervisorProcess(config)
    cleanup = supervisors(process)
    next(cleanup)
    try:
        process.start_and_wait()
        yield Target(process, f"guarded{unique}", f"sec{unique}", broker_url, service)
    finally:
        with pytest.raises(StopIteration):
            next(cleanup)


def _signed(body: bytes, key: bytes = KEY) -> dict[str, Any]:
    return signing.sign_headers(key, body)


def test_forged_commands_change_nothing(target: Target) -> None:
    pid = target.pid()
    stop_args = {"targets": [target.service]}
    fresh = target.command("stop", stop_args).to_json
    stale = target.command("stop", stop_args, issued_at=time.time() - 3600).to_json()
    future = target.command("stop", stop_args, issued_at=time.time() + 3600).to_json()
    # Within the age window, but issued before this supervisor started.
    before_start = target.command("stop", stop_args, issued_at=target.started_at() - 1).to_json()
    expired = target.command("stop", stop_args, expires_at=time.time() - 1).to_json()
    unaddressed = target.command("stop", stop_args, target=None).to_json()
    oversized = json.dumps({"v": 1, "pad": "x" * 70_000}).encode()
    cases = [
        ("unsigned", fresh(), None),
        ("bad signature", (body := fresh()), _signed(body, OTHER_KEY)),
        ("bad signature", fresh(), _signed(b"another body")),
        # The log shows the first rejection of each kind at once, and both of these are "stale".
        ("stale", before_start, _signed(before_start)),
        ("stale", stale, _signed(stale)),
        ("from the future", future, _signed(future)),
        ("expired", expired, _signed(expired)),
        ("misdirected", unaddressed, _signed(unaddressed)),
        ("malformed", b"{not json", _signed(b"{not json")),
        ("malformed", b'{"v": 1, "type": "command"}', _signed(b'{"v": 1, "type": "command"}')),
        ("oversized", oversized, _signed(oversized)),
        ("bad signature", fresh(), {"x-mrq-signature": "\u00e9" * 64}),
    ]

    # Message N of the cases has the correlation id raw-N.
    replies = target.send_all([(body, headers) for _reason, body, headers in cases])
    assert replies == [], f"rejected commands got replies: {replies}"

    assert target.pid() == pid
    log = target.process.log()
    for reason, _body, _headers in cases:
        assert f"command rejected reason={reason}" in log, f"no rejection logged for: {reason}"
    assert "reason=stale: issued before this receiver started" in log
    assert CLUSTER_KEY not in log
    assert CLUSTER_KEY not in (target.process.state_dir / "supervisor.log").read_text()


def test_replayed_command_runs_once(target: Target) -> None:
    pid = target.pid()
    body = target.command("restart", {"targets": [f"{target.service}:0"]}).to_json()

    replies = [signing.verify_reply(KEY, raw, _signed(raw)) for raw in target.send(body, _signed(body), 5)]
    final = [r for r in replies if not r.result.get("pending")]
    assert len(final) == 1, replies
    assert final[0].ok, final[0].error
    restarted_pid = target.pid()
    assert restarted_pid != pid

    assert target.send(body, _signed(body)) == []
    assert target.pid() == restarted_pid
    assert "command rejected reason=replayed" in target.process.log()


def test_command_for_other_node_rejected(target: Target) -> None:
    pid = target.pid()
    # Signed for node "elsewhere", captured and published to this node's routing key.
    command = target.command("stop", {"targets": [target.service]}, target="supervisor.elsewhere")
    body = command.to_json()

    assert target.send(body, _signed(body)) == []

    assert target.pid() == pid
    assert "command rejected reason=misdirected: addressed to 'supervisor.elsewhere'" in target.process.log()


def test_command_replayed_after_restart_rejected(target: Target) -> None:
    body = target.command("stop", {"targets": [target.service]}).to_json()
    replies = [signing.verify_reply(KEY, raw, _signed(raw)) for raw in target.send(body, _signed(body), 5)]
    assert [r.ok for r in replies if not r.result.get("pending")] == [True]
    assert instance_row(target.process.config, target.service, 0)["state"] == "stopped"

    assert target.process.stop() == []
    offset = len(target.process.log())
    target.process.start_and_wait()
    pid = target.pid()

    assert target.send(body, _signed(body)) == []
    assert target.pid() == pid
    log = target.process.log()[offset:]
    assert "command rejected reason=stale: issued before this receiver started" in log


def test_signed_command_gets_signed_reply(target: Target) -> None:
    command = target.command("status", {})
    body = command.to_json()

    (raw,) = target.send(body, _signed(body))

    reply = decode(raw)
    assert isinstance(reply, Reply)
    assert reply.ok
    assert reply.command_id == command.id
    assert reply.node == target.node
    assert reply.result["known_nodes"] == [target.node]
    assert [row["service"] for row in reply.result["instances"]] == [target.service]


def test_unknown_command_and_bad_arguments_fail_cleanly(target: Target) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("dance", {}, "unknown command 'dance'"),
        ("scale", {"service": target.service}, "invalid arguments for command 'scale': replicas"),
        ("stop", {"targets": ["no such"]}, "invalid target 'no such'"),
    ]
    for name, args, expected in cases:
        body = target.command(name, args).to_json()
        (raw,) = target.send(body, _signed(body))
        reply = decode(raw)
        assert isinstance(reply, Reply)
        assert not reply.ok
        assert expected in (reply.error or "")


# --- properties of the decoder and the handler -------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


header_names = st.sampled_from(["x-mrq-signature", "other"])
headers_strategy = st.one_of(
    st.none(),
    st.just({}),
    st.dictionaries(header_names, st.text(max_size=70) | st.binary(max_size=70)),
)
# What sdk.signing handles today: a signature header of ASCII text or bytes.
ascii_headers_strategy = st.one_of(
    st.none(),
    st.dictionaries(
        header_names,
        st.text(st.characters(max_codepoint=127), max_size=70)
        | st.binary(max_size=70).map(lambda raw: bytes(b & 0x7F for b in raw)),
    ),
)


ARGUMENT_NAMES = ["targets", "all", "service", "replicas", "target", "lines", "limit", "route", "x"]


@st.composite
def signed_commands(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A signed, fresh command with a known or random name and random arguments."""
    name = draw(st.sampled_from([*COMMANDS, "bogus"]))
    args = draw(
        st.dictionaries(
            st.sampled_from(
                ["targets", "all", "service", "replicas", "target", "lines", "limit", "route", "x"]
            ),
            json_values,
            max_size=4,
        )
    )
    # supervisor.all reaches every node, so the attached server accepts it.
    body = signing.make_command(name, args, sender="hypothesis", target="supervisor.all").to_json()
    return body, _signed(body)


@given(body=st.binary(max_size=300), headers=ascii_headers_strategy)
@settings(max_examples=300, deadline=None)
def test_verifier_rejects_random_bytes_cleanly(body: bytes, headers: dict[str, Any] | None) -> None:
    verifier = signing.CommandVerifier(KEY, max_age_s=30)
    try:
        command = verifier.verify(body, headers)
    except SignatureError:
        return
    assert isinstance(command, Command)


def test_verifier_rejects_non_ascii_signature_header() -> None:
    verifier = signing.CommandVerifier(KEY, max_age_s=30)
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.verify(b"{}", {"x-mrq-signature": "\u00e9" * 64})


@given(value=json_values)
@settings(max_examples=300, deadline=None)
def test_verifier_handles_signed_random_json(value: Any) -> None:
    body = _encode(value)
    verifier = signing.CommandVerifier(KEY, max_age_s=30)
    with pytest.raises(SignatureError, match="malformed"):
        verifier.verify(body, _signed(body))


@pytest.fixture
def attached_server(tmp_path: Path, unique: str) -> ControlServer:
    """A control server bound to a real node that was built from a config but not started."""
    config = write_config(
        tmp_path,
        node=f"offline{unique}",
        broker_url="amqp://guest:guest@127.0.0.1:5672/",
        exchange=f"prop{unique}",
        services={f"svc{unique}": program_service()},
    )
    node = Node(load_config(config))
    node.key = KEY
    server = ControlServer()
    server.attach(node)
    return server


@pytest.mark.timeout(300)
def test_handler_never_crashes(attached_server: ControlServer) -> None:
    @given(
        message=st.one_of(
            st.tuples(st.binary(max_size=300), headers_strategy),
            st.tuples(json_values.map(_encode), st.none()),
            json_values.map(_encode).map(lambda body: (body, _signed(body))),
            signed_commands(),
        )
    )
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(message: tuple[bytes, dict[str, Any] | None]) -> None:
        body, headers = message
        reply = anyio.run(attached_server.handle, body, headers)
        assert reply is None or isinstance(reply, Reply)
        if reply is not None:
            assert reply.ok or reply.error
            assert "known_nodes" in reply.result

    check()


# --- the peer book ----------------------------------------------------------------------


def _presence(node: str, state: str = "up") -> NodeStatus:
    return NodeStatus(node=node, pid=1, host="h", version="0", started_at=0, sent_at=0, state=state)  # type: ignore[arg-type]


def test_peer_book_adds_and_drops() -> None:
    book = PeerBook("self", silence_s=100)
    book.observe(_presence("a"), now=1000)
    book.observe(_presence("b"), now=1000)
    assert book.known() == ["a", "b", "self"]

    book.observe(_presence("a", "down"), now=1001)
    assert book.known() == ["b", "self"]

    book.forget_silent(now=1099)
    assert book.known() == ["b", "self"]
    book.forget_silent(now=1101)
    assert book.known() == ["self"]


def test_peer_book_round_trips_and_ignores_garbage() -> None:
    book = PeerBook("self")
    book.observe(_presence("a"), now=time.time())
    restored = PeerBook("self")
    restored.load(book.dump(), now=time.time())
    assert restored.known() == ["a", "self"]

    broken = PeerBook("self")
    broken.load("{not json", now=time.time())
    assert broken.known() == ["self"]
    broken.load('[{"node": "x"}]', now=time.time())
    assert broken.known() == ["self"]
