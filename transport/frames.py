"""The client's frames and request bodies, validated by msgspec schemas.

Unknown fields are ignored, so a newer client may add fields an older
server does not know; every known field is type-checked and bounded.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from transport.errors import BadRequest, InvalidJSON, UnknownType

ActionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | int
ActionName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Seq = Annotated[int, msgspec.Meta(ge=1)]
Cursor = Annotated[int, msgspec.Meta(ge=0)]
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


class ActionBody(msgspec.Struct):
    id: ActionId
    action: ActionName
    payload: dict[str, Any] = {}
    traceparent: Traceparent | None = None


class AckBody(msgspec.Struct):
    seq: Seq


_frames = msgspec.json.Decoder(Frame)
_action_body = msgspec.json.Decoder(ActionBody)
_ack_body = msgspec.json.Decoder(AckBody)
_encoder = msgspec.json.Encoder()


def _decode(decoder: msgspec.json.Decoder[Any], data: str | bytes) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        if not isinstance(exc, msgspec.ValidationError):
            raise InvalidJSON(f"not a JSON object: {exc}") from None
        text = str(exc)
        if "`$.type`" in text or "missing required field `type`" in text:
            raise UnknownType(f"unknown frame type: {text}") from None
        raise BadRequest(text) from None


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
