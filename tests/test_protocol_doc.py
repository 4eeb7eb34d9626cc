"""docs/protocol.md: every JSON example decodes, and the signature example checks out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdk import signing
from sdk.errors import SignatureError
from sdk.wire import Command, Event, Goodbye, Heartbeat, Hello, NodeStatus, Reply, decode

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
FENCE = re.compile(r"^```([\w-]+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == language]


def test_every_json_example_decodes() -> None:
    decoded = [decode(block.encode()) for block in _blocks("json")]

    kinds = {type(message) for message in decoded}
    assert kinds == {Hello, Heartbeat, Goodbye, NodeStatus, Command, Reply, Event}


def test_signature_example_verifies() -> None:
    (block,) = _blocks("signature-example")
    fields = dict(line.split(": ", 1) for line in block.strip().splitlines())
    key, body = fields["key"].encode(), fields["body"].encode()
    headers = {"x-mrq-signature": fields["x-mrq-signature"]}

    assert signing.signature(key, body) == fields["x-mrq-signature"]
    command = decode(body)
    assert isinstance(command, Command)
    assert command.target is not None
    verifier = signing.CommandVerifier(key, max_age_s=30, targets={command.target})
    assert verifier.verify(body, headers, now=command.issued_at + 1).name == "status"
    with pytest.raises(SignatureError, match="bad signature"):
        verifier.verify(body + b" ", headers, now=command.issued_at + 1)


def test_signature_example_rejected_elsewhere_and_late() -> None:
    (block,) = _blocks("signature-example")
    fields = dict(line.split(": ", 1) for line in block.strip().splitlines())
    key, body = fields["key"].encode(), fields["body"].encode()
    headers = {"x-mrq-signature": fields["x-mrq-signature"]}
    command = decode(body)
    assert isinstance(command, Command)
    assert command.expires_at is not None

    elsewhere = signing.CommandVerifier(key, max_age_s=30, targets={"supervisor.web-2"})
    with pytest.raises(SignatureError, match="misdirected"):
        elsewhere.verify(body, headers, now=command.issued_at + 1)
    late = signing.CommandVerifier(key, max_age_s=30, targets={command.target or ""})
    with pytest.raises(SignatureError, match="expired"):
        late.verify(body, headers, now=command.expires_at + 1)
