"""The client's frames, request bodies and query strings, validated by msgspec schemas.

Unknown fields are ignored, so a newer client may add fields an older
server does not know; every known field is type-checked and bounded.
Strings are bounded by their schema, or by TRANSPORT_MAX_FRAME_BYTES for
the free-form payload, whose nesting TRANSPORT_MAX_PAYLOAD_DEPTH bounds.
The OpenAPI document (transport.openapi) is built from these same schemas.
"""

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec
from django.conf import settings

from transport.errors import BadRequest, InvalidJSON, UnknownType

ActionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | int
ActionName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
# Seqs are 64-bit database integers; a seq or cursor past 2**62 is surely
# an error, and one past 2**63 would not even fit the database's column.
MAX_CURSOR = 2**62
Seq = Annotated[int, msgspec.Meta(ge=1, le=MAX_CURSOR)]
Cursor = Annotated[int, msgspec.Meta(ge=0, le=MAX_CURSOR)]
# Any finite number of seconds: more than the maximum is capped, not refused.
Seconds = Annotated[float, msgspec.Meta(ge=0, le=sys.float_info.max)]
# Messages one poll or mailbox read returns at most; the client asks again.
MAX_BATCH = 1000
DEFAULT_BATCH = 100
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)]
Traceparent = Annotated[str, msgspec.Meta(max_length=128)]
Token = Annotated[str, msgspec.Meta(max_length=512)]


class Hello(msgspec.Struct, tag="hello", tag_field="type"):
    token: Token | None = None
    after: Cursor | None = None


class Action(msgspec.Struct, tag="action", tag_field="type"):
    id: ActionId
    action: ActionName
    payload: dict[str, Any] = {}
    traceparent: Traceparent | None = None


class Ack(msgspec.Struct, tag="ack", tag_field="type"):
    seq: Seq


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


Frame = Hello | Action | Ack | Ping

Q = TypeVar("Q", bound=msgspec.Struct)


class ActionBody(msgspec.Struct):
    id: ActionId
    action: ActionName
    payload: dict[str, Any] = {}
    traceparent: Traceparent | None = None


class AckBody(msgspec.Struct):
    seq: Seq


class PollQuery(msgspec.Struct):
    after: Cursor = 0
    # None: TRANSPORT_POLL_TIMEOUT_DEFAULT; anything above the maximum is capped.
    timeout: Seconds | None = None


class MailboxQuery(msgspec.Struct):
    after: Cursor = 0
    limit: BatchSize = DEFAULT_BATCH


_frames = msgspec.json.Decoder(Frame)
_action_body = msgspec.json.Decoder(ActionBody)
_ack_body = msgspec.json.Decoder(AckBody)
_encoder = msgspec.json.Encoder()


def _decode(decoder: msgspec.json.Decoder[Any], data: str | bytes) -> Any:
    try:
        decoded = decoder.decode(data)
    except RecursionError:
        # msgspec recurses per level of nesting: a frame of brackets within
        # the size limit must be a bad request, not a crash.
        raise BadRequest("nested too deeply") from None
    except msgspec.DecodeError as exc:
        if not isinstance(exc, msgspec.ValidationError):
            raise InvalidJSON(f"not a JSON object: {exc}") from None
        text = str(exc)
        if "`$.type`" in text or "missing required field `type`" in text:
            raise UnknownType(f"unknown frame type: {text}") from None
        raise BadRequest(text) from None
    if isinstance(decoded, Action | ActionBody):
        _check_depth(decoded.payload)
    return decoded


def _check_depth(payload: Any) -> None:
    """Refuse a payload nested deeper than TRANSPORT_MAX_PAYLOAD_DEPTH (no recursion)."""
    limit = settings.TRANSPORT_MAX_PAYLOAD_DEPTH
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            raise BadRequest(f"payload nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def decode_query(schema: type[Q], params: Mapping[str, str]) -> Q:
    """Validate a query string (its text values converted by the schema's types)."""
    try:
        query = msgspec.convert(dict(params.items()), schema, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
    # Lax conversion reads the text "null" as None, which stands for an
    # absent parameter; a parameter given must carry a value.
    for name, value in params.items():
        if name in schema.__struct_fields__ and getattr(query, name) is None:
            raise BadRequest(f"Expected a value for `{name}`, got {value!r}")
    return query


def decode_frame(data: str | bytes) -> Frame:
    """Parse one WebSocket frame, or raise a BadRequest naming what is wrong."""
    frame: Frame = _decode(_frames, data)
    return frame


def decode_action(data: bytes) -> ActionBody:
    body: ActionBody = _decode(_action_body, data)
    return body


def decode_ack(data: bytes) -> AckBody:
    body: AckBody = _decode(_ack_body, data)
    return body


def encode(obj: Any) -> bytes:
    """Serialise a frame or body (datetimes as RFC 3339)."""
    return _encoder.encode(obj)


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def message_frame(seq: int, message_type: str, payload: Any, sent_at: datetime) -> bytes:
    """Serialise a pushed mailbox message."""
    stamp = sent_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{sent_at.microsecond // 1000:03d}Z"
    )
    return encode(
        {
            "type": "message",
            "seq": seq,
            "message_type": message_type,
            "payload": payload,
            "sent_at": stamp,
        }
    )
