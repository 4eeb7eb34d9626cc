"""Message bodies: Python objects to bytes with a content type, and back."""

from __future__ import annotations

from typing import Any, Final

import orjson
from pydantic import BaseModel

from sdk.errors import BadMessage

JSON: Final = "application/json"
TEXT: Final = "text/plain"
BINARY: Final = "application/octet-stream"

_JSON_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON; send a dict, list, str or bytes")


def encode(body: Any) -> tuple[bytes, str]:
    """Encode a body: bytes as they are, str as UTF-8 text, anything else as JSON."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), BINARY
    if isinstance(body, str):
        return body.encode(), TEXT
    if isinstance(body, BaseModel):
        return body.__pydantic_serializer__.to_json(body), JSON
    try:
        return orjson.dumps(body, default=_default, option=_JSON_OPTIONS), JSON
    except TypeError as exc:
        raise TypeError(f"cannot encode the message body: {exc}") from exc


def decode(data: bytes, content_type: str | None) -> Any:
    """Decode a body by its content type; unknown types stay bytes."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == JSON or kind.endswith("+json"):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadMessage(f"invalid JSON body: {exc}") from None
    if kind.startswith("text/"):
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise BadMessage(f"invalid UTF-8 in a text body: {exc}") from None
    return data
