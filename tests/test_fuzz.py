"""Generated frames and requests thrown at the WebSocket consumer and the REST views.

Hypothesis builds frames and bodies from the protocol's own shapes (valid
ones, near misses, wrong types, deep nesting, garbage, binary, oversized)
and tokens from a real session's (forged, truncated, swapped). Whatever
comes in: no exception escapes and nothing is logged as an error, every
answer is a valid reply or a documented error, and the messages stored
for another session are exactly as they were.
"""

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from config.asgi import application
from mailbox import api, store
from mailbox.models import Mailbox, Message
from tests.helpers import hello, recv, send
from transport import tokens

pytestmark = pytest.mark.django_db(transaction=True)

# 200 batches of 50: 10,000 frames at the consumer, and as many requests
# at the views.
BATCHES = 200
REST_BATCHES = 200
BATCH = 50
# Small enough that generated padding crosses it now and then.
FRAME_LIMIT = 4096

ERROR_CODES = {
    "invalid_json",
    "unknown_type",
    "bad_request",
    "unexpected_hello",
    "unknown_action",
    "handler_error",
    "timeout",
    "too_many_actions",
    "invalid_token",
    "no_such_session",
    "too_large",
    "rate_limited",
    "unavailable",
}
# Handlers may answer codes of their own; demo.send's are these.
ACTION_CODES = ERROR_CODES | {"demo_disabled"}
CLOSE_CODES = {1009, 4400, 4401}


# --- strategies -----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
ids = st.text(max_size=140) | st.integers(min_value=-(2**70), max_value=2**70) | values
names = st.sampled_from(["echo", "demo.send", "no.such.action", ""]) | st.text(max_size=110)
payloads = st.dictionaries(st.text(max_size=8), values, max_size=5) | values
seqs = st.integers(min_value=-3, max_value=2**64) | values
types = st.sampled_from(["hello", "action", "ack", "ping", "pong", "message", "reply", ""])


NESTED_PREFIX = '{"type": "action", "id": 1, "action": "echo", "payload": {"a": '


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def objects(tokens_: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Return frame-shaped objects: any subset of the protocol's fields, any values."""
    return st.fixed_dictionaries(
        {},
        optional={
            "type": types | values,
            "id": ids,
            "action": names | values,
            "payload": payloads,
            "seq": seqs,
            "token": tokens_ | values,
            "after": seqs,
            "traceparent": st.text(max_size=140) | values,
            "unknown": values,
        },
    )


def texts(tokens_: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Return frame texts: mostly valid frames, then every way to get one wrong."""
    echo = st.builds(
        lambda i, p: {"type": "action", "id": i, "action": "echo", "payload": p},
        st.text(min_size=1, max_size=20) | st.integers(min_value=0, max_value=2**40),
        st.dictionaries(st.text(max_size=8), values, max_size=5),
    )
    valid = (
        echo
        | st.builds(lambda s: {"type": "ack", "seq": s}, st.integers(1, 2**62))
        | st.just({"type": "ping"})
    )
    # Within the size limit, deep enough to exhaust a recursive parser.
    nested = st.integers(1, 2000).map(lambda d: f"{NESTED_PREFIX}{deep(d)}}}}}")
    return st.one_of(
        valid.map(json.dumps),
        objects(tokens_).map(json.dumps),
        st.builds(lambda o, cut: json.dumps(o)[:cut], objects(tokens_), st.integers(0, 60)),
        values.map(json.dumps),
        nested,
        st.integers(FRAME_LIMIT - 64, FRAME_LIMIT + 64).map(
            lambda n: json.dumps({"type": "ping", "pad": "x" * n})
        ),
        st.text(max_size=60),
    )


def forged(token: str) -> st.SearchStrategy[str]:
    """Return tokens that look like a real session's but must not open it."""
    session_id, _, rest = token.partition(":")
    return st.sampled_from(
        [
            token[:-1] + ("A" if token[-1] != "A" else "B"),
            token[:-5],
            f"s_{'x' * 22}:{rest}",
            signing_with_other_salt(session_id),
            "",
            "not-a-token",
        ]
    ) | st.text(max_size=80)


def signing_with_other_salt(session_id: str) -> str:
    from django.core import signing

    return signing.TimestampSigner(salt="another.purpose").sign(session_id)


# --- the session whose mailbox must not change -----------------------------------


@sync_to_async
def snapshot(session_id: str) -> tuple[Any, list[Any]]:
    box = Mailbox.objects.values_list("last_seq", "acked_seq", "lost_seq", "queued").get(
        session_id=session_id
    )
    rows = Message.objects.filter(mailbox_id=session_id).order_by("seq")
    return box, list(rows.values_list("seq", "message_type", "payload", "acked_at", "expires_at"))


@pytest.fixture
async def victim() -> dict[str, Any]:
    """Return a session with three queued messages, and its token."""
    box = await sync_to_async(store.create_session)()
    for n in (1, 2, 3):
        await sync_to_async(api.deliver)(box.session_id, "private", {"n": n})
    return {"session_id": box.session_id, "token": tokens.issue(box.session_id)}


@pytest.fixture
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """Collect every record logged at error level or above while the test runs."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.ERROR)
    root = logging.getLogger()
    root.addHandler(handler)
    # Thousands of connect and request lines at info would cost more time
    # than the cases themselves; warnings and errors still go through.
    logging.disable(logging.INFO)
    try:
        yield records
    finally:
        logging.disable(logging.NOTSET)
        root.removeHandler(handler)


# --- WebSocket ------------------------------------------------------------------


def assert_documented_frame(frame: dict[str, Any]) -> None:
    """Fail unless a frame from the server is one the protocol and its notes describe."""
    kind = frame.get("type")
    if kind == "pong":
        assert frame == {"type": "pong"}
    elif kind == "error":
        assert set(frame) == {"type", "code", "message"}, frame
        assert frame["code"] in ERROR_CODES, frame
    elif kind == "reply":
        assert isinstance(frame.get("ok"), bool), frame
        if frame["ok"]:
            assert set(frame) == {"type", "id", "ok", "payload"}, frame
        else:
            assert set(frame) == {"type", "id", "ok", "error"}, frame
            assert frame["error"]["code"] in ACTION_CODES, frame
    elif kind == "message":
        # A late reply, delivered to the mailbox as the notes say.
        assert frame["message_type"] == "reply", frame
    elif kind == "welcome":
        assert {"session_id", "token", "resumed", "next_seq"} <= set(frame), frame
    else:
        raise AssertionError(f"undocumented frame {frame!r}")


class Conversation:
    """One fuzzed connection at a time; a new one (welcomed or not) when it closes."""

    def __init__(self) -> None:
        self.comm: WebsocketCommunicator | None = None
        # Actions of the open connection that met no error, and replies had.
        self.taken = 0
        self.replies = 0
        self.frames = 0

    async def open(self, greet: bool) -> WebsocketCommunicator:
        comm = WebsocketCommunicator(application, "/ws/transport/")
        comm.scope["client"] = ("192.0.2.10", 50000)
        connected, _ = await comm.connect()
        assert connected
        if greet:
            await hello(comm)
        self.comm, self.taken, self.replies = comm, 0, 0
        return comm

    async def disconnect(self) -> None:
        if self.comm is not None:
            await self.comm.disconnect()
            self.comm = None

    async def throw(self, text: str | bytes, greet: bool) -> None:
        """Send one frame, then a ping; check every answer up to the pong."""
        comm = self.comm or await self.open(greet)
        self.frames += 1
        # send_input, not send_to, which cannot send an empty frame.
        key = "bytes" if isinstance(text, bytes) else "text"
        await comm.send_input({"type": "websocket.receive", key: text})
        await send(comm, {"type": "ping"})

        # A frame that is a valid ping gets its own pong before ours.
        kind = _type_of(text)
        refused = own_pong = False
        while True:
            output = await comm.receive_output(10)
            if output["type"] == "websocket.close":
                assert output.get("code") in CLOSE_CODES, output
                await comm.disconnect()
                self.comm = None
                return
            frame = json.loads(output["text"])
            assert_documented_frame(frame)
            if frame["type"] == "pong":
                if kind == "ping" and not refused and not own_pong:
                    own_pong = True
                    continue
                break
            if frame["type"] == "reply":
                self.replies += 1
            refused = refused or frame["type"] == "error"
        if not refused and kind == "action":
            self.taken += 1

    async def drain(self) -> None:
        """Wait for the reply to every action the server took."""
        if self.comm is None:
            return
        while self.replies < self.taken:
            frame = await recv(self.comm, timeout=10)
            assert_documented_frame(frame)
            assert frame["type"] == "reply", frame
            self.replies += 1
        assert self.replies == self.taken


def _type_of(text: str | bytes) -> Any:
    """Return the `type` of a text frame that is a JSON object, else None."""
    if isinstance(text, bytes):
        return None
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return frame.get("type") if isinstance(frame, dict) else None


class Fuzzing:
    """What the examples of one property test share: a victim, a connection, counts."""

    def __init__(self, victim: dict[str, Any], before: Any, errors: list[Any]) -> None:
        self.victim = victim
        self.before = before
        self.errors = errors
        self.cases = 0
        self.expected = BATCHES * BATCH

    async def assert_nothing_changed(self) -> None:
        assert self.errors == [], [record.getMessage() for record in self.errors]
        assert await snapshot(self.victim["session_id"]) == self.before


@pytest.fixture
async def fuzzing(victim, settings, errors_logged) -> AsyncIterator[Fuzzing]:
    """Yield the state shared by every example; check the total once all have run."""
    settings.TRANSPORT_MAX_FRAME_BYTES = FRAME_LIMIT
    settings.TRANSPORT_POLL_TIMEOUT_MAX = 0
    state = Fuzzing(victim, await snapshot(victim["session_id"]), errors_logged)
    yield state
    await state.assert_nothing_changed()
    print(f"\n{state.cases} generated cases tried")
    assert state.cases >= state.expected


@pytest.mark.timeout(600)
@given(data=st.data(), greet=st.booleans())
@hypothesis_settings(max_examples=BATCHES)
async def test_no_generated_frame_escapes_the_protocol(fuzzing, data, greet):
    frame = texts(forged(fuzzing.victim["token"])) | st.binary(max_size=60)
    conversation = Conversation()

    # One connection per batch, a new one whenever the server closes it.
    # The first may skip hello, to test first frames; the others say hello,
    # so that later frames reach a welcomed session.
    try:
        for text in data.draw(st.lists(frame, min_size=BATCH, max_size=BATCH)):
            await conversation.throw(text, greet)
            greet = True
        await conversation.drain()
    finally:
        await conversation.disconnect()

    fuzzing.cases += conversation.frames
    await fuzzing.assert_nothing_changed()


# --- REST -------------------------------------------------------------------------

ENDPOINTS = {
    "/transport/sessions": "post",
    "/transport/actions": "post",
    "/transport/ack": "post",
    "/transport/poll": "get",
    "/transport/mailbox": "get",
}
# Statuses each endpoint may answer with a body of the protocol's error shape.
ERROR_STATUSES = {
    400: {"invalid_json", "unknown_type", "bad_request"},
    401: {"invalid_token"},
    404: {"no_such_session"},
    413: {"too_large"},
}
SUCCESS: dict[str, dict[int, set[str] | None]] = {
    "/transport/sessions": {201: {"session_id", "token", "next_seq"}},
    "/transport/actions": {200: None, 202: {"id", "status"}},
    "/transport/ack": {204: set()},
    "/transport/poll": {200: {"messages", "next_after", "gap"}},
    "/transport/mailbox": {200: {"messages", "next_after", "gap"}},
}

queries = st.dictionaries(
    st.sampled_from(["after", "limit", "timeout", "other"]),
    st.text(max_size=12)
    | st.integers(min_value=-5, max_value=2**64).map(str)
    | st.floats().map(str),
    max_size=3,
)


def assert_documented_response(path: str, method: str, response: Any) -> None:
    """Fail unless an answer is a valid reply or a documented error of its endpoint."""
    status = response.status_code
    if method != ENDPOINTS[path]:
        assert status == 405, (path, method, status)
        return
    if status in SUCCESS[path]:
        keys = SUCCESS[path][status]
        if status == 204:
            assert response.content == b""
            return
        body = response.json()
        if keys is None:
            assert_documented_frame(body)
            assert body["type"] == "reply"
        else:
            assert set(body) == keys, body
        return
    assert status in ERROR_STATUSES, (path, status, response.content)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] in ERROR_STATUSES[status], (status, body)


@pytest.mark.timeout(600)
@given(data=st.data())
@hypothesis_settings(max_examples=REST_BATCHES)
async def test_no_generated_request_escapes_the_protocol(fuzzing, data):
    fuzzing.expected = REST_BATCHES * BATCH
    client = AsyncClient()
    own = await client.post("/transport/sessions")
    token = own.json()["token"]
    # Header values travel as bytes; a server reads them as latin-1.
    authorizations = st.sampled_from([f"Bearer {token}", ""]) | forged(
        fuzzing.victim["token"]
    ).map(lambda t: f"Bearer {t}".encode().decode("latin-1"))
    requests = st.tuples(
        st.sampled_from(sorted(ENDPOINTS)),
        st.sampled_from(["get", "post"]),
        authorizations,
        texts(forged(fuzzing.victim["token"])),
        queries,
    )

    for path, method, authorization, body, query in data.draw(
        st.lists(requests, min_size=BATCH, max_size=BATCH)
    ):
        response = await client.generic(
            method.upper(),
            f"{path}?{urlencode(query)}",
            data=body if method == "post" else "",
            content_type="application/json",
            headers={"Authorization": authorization} if authorization else {},
        )
        assert_documented_response(path, method, response)
        fuzzing.cases += 1

    await fuzzing.assert_nothing_changed()
