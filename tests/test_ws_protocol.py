"""The WebSocket transport against every row of the protocol, in-process.

Each test talks to the real consumer through Channels' communicator, with the
real SQLite test database and the in-memory channel layer.
"""

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core import signing
from django.dispatch import Signal
from django.utils import timezone

from mailbox import api, store
from mailbox import signals as mailbox_signals
from mailbox.models import Mailbox, Message
from tests.helpers import hello, recv, send
from transport import acks, registry, tokens
from transport import signals as transport_signals
from transport.leases import leases
from transport.registry import ActionContext, ActionError, Payload

pytestmark = pytest.mark.django_db(transaction=True)

Connect = Callable[..., Awaitable[WebsocketCommunicator]]

deliver = sync_to_async(api.deliver)

SENT_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

# Long enough for a wrongly pushed frame to show up on a loaded machine; a
# pass after it proves nothing was sent, a failure is never a timing fluke.
QUIET = 0.3


# --- helpers ----------------------------------------------------------------


async def closed(comm: WebsocketCommunicator) -> tuple[int, str]:
    """Return the code and reason of the close the server sent next."""
    output = await comm.receive_output(3)
    assert output["type"] == "websocket.close", output
    return output.get("code", 1000), output.get("reason", "")


async def messages(comm: WebsocketCommunicator, count: int) -> list[dict[str, Any]]:
    """Receive `count` pushed message frames."""
    frames = [await recv(comm) for _ in range(count)]
    assert all(frame["type"] == "message" for frame in frames), frames
    return frames


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [frame["seq"] for frame in frames]


async def settled(comm: WebsocketCommunicator) -> None:
    """Wait until every earlier frame was handled: frames are handled in order."""
    await send(comm, {"type": "ping"})
    assert await recv(comm) == {"type": "pong"}


async def offline_session(ws: Connect) -> dict[str, Any]:
    """Open a session, then leave: return its welcome."""
    comm = await ws()
    welcome = await hello(comm)
    await comm.disconnect()
    return welcome


async def queue(session_id: str, count: int, **options: Any) -> list[int | None]:
    return [await deliver(session_id, "note", {"n": n}, **options) for n in range(1, count + 1)]


@sync_to_async
def stored(session_id: str) -> list[int]:
    """Return the seqs of a session's unacknowledged messages."""
    rows = Message.objects.filter(mailbox_id=session_id, acked_at__isnull=True)
    return list(rows.order_by("seq").values_list("seq", flat=True))


async def stored_once_acks_are(session_id: str, expected: list[int]) -> list[int]:
    """Return the unacknowledged seqs once they are `expected`, or after two seconds.

    Acks are written a little after they arrive (transport.acks.LINGER).
    """
    deadline = time.monotonic() + 2
    found = await stored(session_id)
    while found != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        found = await stored(session_id)
    return found


@pytest.fixture
def actions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Return registry.register, on a copy of the registry restored after the test."""
    monkeypatch.setattr(registry, "_handlers", dict(registry._handlers))
    yield registry.register


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Record every mailbox and transport signal as (name, arguments)."""
    recorded: list[tuple[str, dict[str, Any]]] = []
    connected: list[tuple[Signal, Callable[..., None]]] = []
    for module in (mailbox_signals, transport_signals):
        for name, signal in vars(module).items():
            if not isinstance(signal, Signal):
                continue

            def receiver(sender: Any, signal: Any = None, _name: str = name, **kw: Any) -> None:
                recorded.append((_name, kw))

            signal.connect(receiver, weak=False)
            connected.append((signal, receiver))
    yield recorded
    for signal, receiver in connected:
        signal.disconnect(receiver)


def named(events: list[tuple[str, dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    return [kw for event, kw in events if event == name]


# --- hello and welcome ------------------------------------------------------


async def test_hello_without_token_is_welcomed_with_exactly_the_protocol_fields(ws):
    comm = await ws()

    welcome = await hello(comm)

    assert set(welcome) == {"type", "session_id", "token", "resumed", "next_seq"}
    assert welcome["resumed"] is False
    assert welcome["session_id"].startswith("s_")
    assert welcome["next_seq"] == 1
    assert tokens.session_of(welcome["token"]) == welcome["session_id"]


async def test_each_hello_without_token_opens_a_new_session(ws):
    first = await hello(await ws())
    second = await hello(await ws())

    assert first["session_id"] != second["session_id"]


async def test_hello_with_token_and_after_resumes_with_gap_then_pushes_what_follows(ws):
    session = await offline_session(ws)
    await queue(session["session_id"], 5)

    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=2)

    assert welcome["resumed"] is True
    assert welcome["gap"] is False
    assert welcome["session_id"] == session["session_id"]
    assert welcome["next_seq"] == 6
    assert set(welcome) == {"type", "session_id", "token", "resumed", "gap", "next_seq"}
    pushed = await messages(comm, 3)
    assert seqs(pushed) == [3, 4, 5]
    assert [m["payload"] for m in pushed] == [{"n": 3}, {"n": 4}, {"n": 5}]
    await comm.receive_nothing(QUIET)


async def test_after_in_hello_acknowledges_every_seq_up_to_it(ws):
    session = await offline_session(ws)
    await queue(session["session_id"], 4)

    comm = await ws()
    await hello(comm, token=session["token"], after=2)
    await messages(comm, 2)
    await comm.disconnect()

    # A later resume from 0 must not bring back what `after=2` acknowledged.
    again = await ws()
    await hello(again, token=session["token"], after=0)
    assert seqs(await messages(again, 2)) == [3, 4]
    assert await stored(session["session_id"]) == [3, 4]


async def test_hello_with_token_and_no_after_resumes_from_the_acked_cursor(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 3)
    await messages(comm, 3)
    await send(comm, {"type": "ack", "seq": 2})
    await settled(comm)
    await comm.disconnect()

    again = await ws()
    welcome = await hello(again, token=session["token"])

    assert welcome["resumed"] is True
    assert welcome["gap"] is False
    assert seqs(await messages(again, 1)) == [3]
    await again.receive_nothing(QUIET)


async def test_welcome_carries_a_fresh_token_for_the_same_session(ws):
    session = await offline_session(ws)

    welcome = await hello(await ws(), token=session["token"])

    assert tokens.session_of(welcome["token"]) == session["session_id"]


# --- actions ----------------------------------------------------------------


async def test_echo_action_is_answered_with_its_payload(ws):
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "echo", "payload": {"x": [1, 2]}})

    assert await recv(comm) == {"type": "reply", "id": "r1", "ok": True, "payload": {"x": [1, 2]}}


async def test_an_integer_action_id_comes_back_as_an_integer(ws):
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": 7, "action": "echo", "payload": {}})

    assert await recv(comm) == {"type": "reply", "id": 7, "ok": True, "payload": {}}


async def test_unknown_action_is_answered_with_unknown_action_error(ws):
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "no.such", "payload": {}})

    reply = await recv(comm)
    assert set(reply) == {"type", "id", "ok", "error"}
    assert reply["id"] == "r1"
    assert reply["ok"] is False
    assert reply["error"]["code"] == "unknown_action"
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


async def test_action_error_raised_by_a_handler_is_answered_with_its_code(ws, actions):
    def refuse(ctx: ActionContext, payload: Payload) -> Payload:
        raise ActionError("out_of_stock", "item 42 is sold out")

    actions("test.refuse", refuse)
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "test.refuse", "payload": {}})

    assert await recv(comm) == {
        "type": "reply",
        "id": "r1",
        "ok": False,
        "error": {"code": "out_of_stock", "message": "item 42 is sold out"},
    }


async def test_unexpected_handler_exception_is_answered_with_an_error_and_the_socket_lives(
    ws, actions
):
    async def crash(ctx: ActionContext, payload: Payload) -> Payload:
        raise RuntimeError("secret internals")

    actions("test.crash", crash)
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "test.crash", "payload": {}})

    reply = await recv(comm)
    assert reply["ok"] is False and reply["id"] == "r1"
    assert set(reply["error"]) == {"code", "message"}
    assert reply["error"]["code"] == "handler_error"
    assert "secret internals" not in reply["error"]["message"]
    await settled(comm)


async def test_a_handler_sees_the_session_and_transport_of_the_action(ws, actions):
    def whoami(ctx: ActionContext, payload: Payload) -> Payload:
        return {"session_id": ctx.session_id, "transport": ctx.transport, "id": ctx.action_id}

    actions("test.whoami", whoami)
    comm = await ws()
    session = await hello(comm)

    await send(comm, {"type": "action", "id": "r9", "action": "test.whoami", "payload": {}})

    reply = await recv(comm)
    assert reply["payload"] == {"session_id": session["session_id"], "transport": "ws", "id": "r9"}


# --- ack and ping -----------------------------------------------------------


async def test_ping_is_answered_with_pong(ws):
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "ping"})

    assert await recv(comm) == {"type": "pong"}


async def test_ack_is_answered_with_nothing(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 1)
    await messages(comm, 1)

    await send(comm, {"type": "ack", "seq": 1})

    await comm.receive_nothing(QUIET)


async def test_ack_is_cumulative(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 5)
    await messages(comm, 5)

    await send(comm, {"type": "ack", "seq": 3})

    assert await stored_once_acks_are(session["session_id"], [4, 5]) == [4, 5]


async def test_an_ack_past_the_last_seq_acknowledges_only_what_exists(ws, monkeypatch):
    # Long enough that the next deliver surely comes before the ack is written.
    monkeypatch.setattr(acks, "LINGER", 0.3)
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 2)
    await messages(comm, 2)
    await send(comm, {"type": "ack", "seq": 1})
    assert await stored_once_acks_are(session["session_id"], [2]) == [2]

    # Right after a write, the next one waits: this ack is stored later.
    await send(comm, {"type": "ack", "seq": 100})
    await settled(comm)
    seq = await deliver(session["session_id"], "later", {})

    assert seq == 3
    assert seqs(await messages(comm, 1)) == [3]
    # Written after seq 3 came, the ack still covers only what existed.
    assert await stored_once_acks_are(session["session_id"], [3]) == [3]


# --- pushed messages --------------------------------------------------------


async def test_a_delivered_message_is_pushed_with_the_protocol_fields(ws):
    comm = await ws()
    session = await hello(comm)

    seq = await deliver(session["session_id"], "order.shipped", {"order": 42})

    frame = await recv(comm)
    assert set(frame) == {"type", "seq", "message_type", "payload", "sent_at"}
    assert frame["type"] == "message"
    assert frame["seq"] == seq == 1
    assert frame["message_type"] == "order.shipped"
    assert frame["payload"] == {"order": 42}
    assert SENT_AT.fullmatch(frame["sent_at"]), frame["sent_at"]
    row = await sync_to_async(Message.objects.get)(mailbox_id=session["session_id"], seq=1)
    expected = row.sent_at.astimezone(UTC).isoformat(timespec="milliseconds")
    assert frame["sent_at"] == expected.replace("+00:00", "Z")
    sent = datetime.strptime(frame["sent_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)


async def test_pushed_messages_keep_seq_order(ws):
    comm = await ws()
    session = await hello(comm)

    await queue(session["session_id"], 5)

    pushed = await messages(comm, 5)
    assert seqs(pushed) == [1, 2, 3, 4, 5]
    assert [m["payload"]["n"] for m in pushed] == [1, 2, 3, 4, 5]


async def test_any_json_payload_is_pushed_unchanged(ws):
    comm = await ws()
    session = await hello(comm)

    await deliver(session["session_id"], "list", [1, "two", None, {"é": 3.5}])

    assert (await recv(comm))["payload"] == [1, "two", None, {"é": 3.5}]


# --- malformed frames after welcome -----------------------------------------


MALFORMED = {
    "bad_json": '{"type": "ping"',
    "non_object_json_array": '["ping"]',
    "non_object_json_number": "42",
    "wrong_types": '{"type": "action", "id": "r1", "action": 5, "payload": {}}',
    "payload_not_an_object": '{"type": "action", "id": "r1", "action": "echo", "payload": [1]}',
    "missing_type": '{"seq": 1}',
    "unknown_type": '{"type": "subscribe"}',
    "ack_seq_zero": '{"type": "ack", "seq": 0}',
    "ack_seq_negative": '{"type": "ack", "seq": -3}',
    "ack_seq_string": '{"type": "ack", "seq": "3"}',
    "ack_seq_float": '{"type": "ack", "seq": 1.5}',
    "ack_seq_boolean": '{"type": "ack", "seq": true}',
    "ack_without_seq": '{"type": "ack"}',
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_frame_is_answered_with_an_error_and_the_socket_stays_usable(ws, text):
    comm = await ws()
    await hello(comm)

    await send(comm, text)

    error = await recv(comm)
    assert set(error) == {"type", "code", "message"}
    assert error["type"] == "error"
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    await send(comm, {"type": "action", "id": "r1", "action": "echo", "payload": {}})
    assert (await recv(comm))["ok"] is True


async def test_malformed_frames_are_answered_with_distinct_codes(ws):
    comm = await ws()
    await hello(comm)

    codes = {}
    for name in ("bad_json", "unknown_type", "ack_seq_zero"):
        await send(comm, MALFORMED[name])
        codes[name] = (await recv(comm))["code"]

    assert codes == {
        "bad_json": "invalid_json",
        "unknown_type": "unknown_type",
        "ack_seq_zero": "bad_request",
    }


async def test_a_binary_frame_is_answered_with_an_error_and_the_socket_stays_usable(ws):
    comm = await ws()
    await hello(comm)

    await comm.send_to(bytes_data=b'{"type": "ping"}')

    error = await recv(comm)
    assert error["type"] == "error"
    assert set(error) == {"type", "code", "message"}
    await settled(comm)


async def test_a_second_hello_is_answered_with_an_error(ws):
    comm = await ws()
    session = await hello(comm)

    await send(comm, {"type": "hello", "token": session["token"]})

    error = await recv(comm)
    assert error["type"] == "error"
    await settled(comm)


async def test_a_malformed_ack_acknowledges_nothing(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 2)
    await messages(comm, 2)

    await send(comm, {"type": "ack", "seq": "2"})
    await recv(comm)

    assert await stored(session["session_id"]) == [1, 2]


async def test_the_eleventh_malformed_frame_closes_with_4400(ws, settings):
    settings.TRANSPORT_MAX_BAD_FRAMES = 10
    comm = await ws()
    await hello(comm)

    for _ in range(10):
        await send(comm, "not json")
        assert (await recv(comm))["type"] == "error"
    await settled(comm)

    await send(comm, "not json")

    code, _ = await closed(comm)
    assert code == 4400


async def test_malformed_frames_are_counted_per_connection(ws, settings):
    settings.TRANSPORT_MAX_BAD_FRAMES = 2
    first = await ws()
    session = await hello(first)
    for _ in range(2):
        await send(first, "not json")
        await recv(first)

    second = await ws()
    await hello(second, token=session["token"])
    await send(second, "not json")

    assert (await recv(second))["type"] == "error"


# --- close codes ------------------------------------------------------------


FIRST_FRAMES = {
    "ping": '{"type": "ping"}',
    "action": '{"type": "action", "id": "r1", "action": "echo", "payload": {}}',
    "ack": '{"type": "ack", "seq": 1}',
    "bad_json": "hello",
    "unknown_type": '{"type": "welcome"}',
    "hello_with_negative_after": '{"type": "hello", "after": -1}',
    "hello_with_numeric_token": '{"type": "hello", "token": 12}',
}


@pytest.mark.parametrize("text", FIRST_FRAMES.values(), ids=FIRST_FRAMES.keys())
async def test_a_first_frame_that_is_not_a_valid_hello_closes_with_4400(ws, text):
    comm = await ws()

    await send(comm, text)

    code, _ = await closed(comm)
    assert code == 4400


async def test_a_binary_first_frame_closes_with_4400(ws):
    comm = await ws()

    await comm.send_to(bytes_data=b'{"type": "hello"}')

    code, _ = await closed(comm)
    assert code == 4400


async def test_a_first_frame_that_is_not_hello_opens_no_session(ws):
    comm = await ws()

    await send(comm, {"type": "ping"})
    await closed(comm)

    assert await sync_to_async(Mailbox.objects.count)() == 0


async def refused(ws: Connect, token: str) -> int:
    comm = await ws()
    await send(comm, {"type": "hello", "token": token, "after": 0})
    code, _ = await closed(comm)
    return code


async def test_a_forged_token_closes_with_4401(ws):
    session = await offline_session(ws)
    forged = signing.TimestampSigner(key="not-the-server-key", salt=tokens._SALT)

    assert await refused(ws, forged.sign(session["session_id"])) == 4401


async def test_a_token_with_another_sessions_id_swapped_in_closes_with_4401(ws):
    victim = await offline_session(ws)
    attacker = await offline_session(ws)
    _, stamp, signature = attacker["token"].rsplit(":", 2)

    assert await refused(ws, f"{victim['session_id']}:{stamp}:{signature}") == 4401


async def test_a_truncated_token_closes_with_4401(ws):
    session = await offline_session(ws)

    assert await refused(ws, session["token"][:-4]) == 4401


async def test_a_token_signed_for_another_purpose_closes_with_4401(ws):
    session = await offline_session(ws)
    other_salt = signing.TimestampSigner(salt="some.other.purpose")

    assert await refused(ws, other_salt.sign(session["session_id"])) == 4401


async def test_an_expired_token_closes_with_4401(ws, settings):
    settings.TRANSPORT_TOKEN_MAX_AGE = 60

    class IssuedAnHourAgo(signing.TimestampSigner):
        def timestamp(self) -> str:
            return signing.b62_encode(int(time.time()) - 3600)

    session = await offline_session(ws)
    old = IssuedAnHourAgo(salt=tokens._SALT).sign(session["session_id"])

    assert await refused(ws, old) == 4401


async def test_a_token_of_a_deleted_session_closes_with_4401(ws):
    session = await offline_session(ws)
    await sync_to_async(Mailbox.objects.filter(session_id=session["session_id"]).delete)()

    assert await refused(ws, session["token"]) == 4401


async def test_a_token_of_an_expired_session_closes_with_4401(ws):
    session = await offline_session(ws)
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Mailbox.objects.filter(session_id=session["session_id"]).update)(
        expires_at=past
    )

    assert await refused(ws, session["token"]) == 4401


async def test_no_hello_in_time_closes_with_4408(ws, settings):
    settings.TRANSPORT_HELLO_TIMEOUT = 0.2
    comm = await ws()

    code, _ = await closed(comm)

    assert code == 4408


async def test_the_hello_clock_stops_at_welcome(ws, settings):
    settings.TRANSPORT_HELLO_TIMEOUT = 0.2
    comm = await ws()
    await hello(comm)

    await asyncio.sleep(0.5)

    await settled(comm)


async def test_a_frame_larger_than_the_limit_closes_with_1009(ws, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 1024
    comm = await ws()
    await hello(comm)

    await send(
        comm, {"type": "action", "id": "r1", "action": "echo", "payload": {"x": "a" * 2000}}
    )

    code, _ = await closed(comm)
    assert code == 1009


async def test_a_first_frame_larger_than_the_limit_closes_with_1009(ws, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 1024
    comm = await ws()

    await send(comm, {"type": "hello", "padding": "a" * 2000})

    code, _ = await closed(comm)
    assert code == 1009


async def test_a_frame_within_the_limit_is_served(ws, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 1024
    comm = await ws()
    await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "echo", "payload": {"x": "a" * 900}})

    assert (await recv(comm))["ok"] is True


async def test_the_frame_limit_counts_bytes_not_characters(ws, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 1024
    comm = await ws()
    await hello(comm)

    # 400 characters, 1200 bytes of UTF-8.
    frame = {"type": "action", "id": "r1", "action": "echo", "payload": {"x": "€" * 400}}
    await send(comm, frame)

    code, _ = await closed(comm)
    assert code == 1009


async def test_a_binary_frame_larger_than_the_limit_closes_with_1009(ws, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 1024
    comm = await ws()
    await hello(comm)

    await comm.send_to(bytes_data=b"x" * 2000)

    code, _ = await closed(comm)
    assert code == 1009


async def test_too_many_frames_close_with_4429_and_the_retry_delay(ws, use_rate_limits):
    use_rate_limits("ws=3/m")
    comm = await ws()  # the handshake counts as one
    await hello(comm)
    await settled(comm)

    await send(comm, {"type": "ping"})

    code, reason = await closed(comm)
    assert code == 4429
    assert reason.isdigit(), reason
    assert 30 < int(reason) <= 60


async def test_a_connection_from_a_limited_network_closes_with_4429(ws, use_rate_limits):
    use_rate_limits("ws=2/m")
    await hello(await ws("192.0.2.10"))

    comm = await ws("192.0.2.77")

    code, reason = await closed(comm)
    assert code == 4429
    assert 1 <= int(reason) <= 60


async def test_rate_limits_do_not_reach_other_networks(ws, use_rate_limits):
    use_rate_limits("ws=2/m")
    await hello(await ws("192.0.2.10"))

    comm = await ws("198.51.100.10")

    await hello(comm)


# --- resume, gaps and overflow ----------------------------------------------


async def test_messages_delivered_while_offline_arrive_in_order_after_reconnect(ws):
    session = await offline_session(ws)
    await deliver(session["session_id"], "a", {"i": 1})
    await deliver(session["session_id"], "b", {"i": 2})
    await deliver(session["session_id"], "c", {"i": 3})

    comm = await ws()
    await hello(comm, token=session["token"], after=0)

    pushed = await messages(comm, 3)
    assert [(m["seq"], m["message_type"]) for m in pushed] == [(1, "a"), (2, "b"), (3, "c")]


async def test_acknowledged_messages_never_come_again(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 3)
    await messages(comm, 3)
    await send(comm, {"type": "ack", "seq": 3})
    await settled(comm)
    await comm.disconnect()

    again = await ws()
    welcome = await hello(again, token=session["token"], after=0)

    assert welcome["next_seq"] == 4
    await again.receive_nothing(QUIET)


async def test_unacknowledged_messages_come_again_after_reconnect(ws):
    comm = await ws()
    session = await hello(comm)
    await queue(session["session_id"], 3)
    await messages(comm, 3)
    await comm.disconnect()

    again = await ws()
    await hello(again, token=session["token"])

    assert seqs(await messages(again, 3)) == [1, 2, 3]


async def test_gap_is_true_after_an_overflow_past_the_clients_cursor(ws, settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    session = await offline_session(ws)
    await queue(session["session_id"], 5)

    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=0)

    assert welcome["gap"] is True
    assert seqs(await messages(comm, 3)) == [3, 4, 5]


async def test_gap_is_false_when_the_overflow_is_behind_the_clients_cursor(ws, settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    session = await offline_session(ws)
    await queue(session["session_id"], 5)

    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=2)

    assert welcome["gap"] is False
    assert seqs(await messages(comm, 3)) == [3, 4, 5]


async def test_gap_is_true_after_an_expiry_past_the_clients_cursor(ws):
    session = await offline_session(ws)
    await queue(session["session_id"], 3)
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Message.objects.filter(mailbox_id=session["session_id"], seq=2).update)(
        expires_at=past
    )

    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=0)

    assert welcome["gap"] is True
    assert seqs(await messages(comm, 2)) == [1, 3]


async def test_gap_is_false_without_any_drop(ws):
    session = await offline_session(ws)
    await queue(session["session_id"], 3)

    welcome = await hello(await ws(), token=session["token"], after=0)

    assert welcome["gap"] is False


async def test_reject_new_policy_drops_the_new_message(ws, settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    settings.TRANSPORT_OVERFLOW_POLICY = "reject-new"
    session = await offline_session(ws)

    assert await queue(session["session_id"], 5) == [1, 2, 3, None, None]

    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=0)
    assert welcome["gap"] is False
    assert welcome["next_seq"] == 4
    assert [m["payload"]["n"] for m in await messages(comm, 3)] == [1, 2, 3]
    await comm.receive_nothing(QUIET)


async def test_every_open_socket_of_a_session_gets_its_messages(ws):
    first = await ws()
    session = await hello(first)
    second = await ws()
    await hello(second, token=session["token"])

    await deliver(session["session_id"], "note", {})

    assert seqs(await messages(first, 1)) == [1]
    assert seqs(await messages(second, 1)) == [1]


# --- flow control -----------------------------------------------------------


async def test_resume_pushes_only_a_window_of_messages_until_acked(ws, settings):
    settings.TRANSPORT_WS_WINDOW = 3
    session = await offline_session(ws)
    await queue(session["session_id"], 10)

    comm = await ws()
    await hello(comm, token=session["token"], after=0)

    assert seqs(await messages(comm, 3)) == [1, 2, 3]
    await comm.receive_nothing(QUIET)

    await send(comm, {"type": "ack", "seq": 3})
    assert seqs(await messages(comm, 3)) == [4, 5, 6]
    await comm.receive_nothing(QUIET)

    # A partial ack opens the window by as many as it acknowledged.
    await send(comm, {"type": "ack", "seq": 5})
    assert seqs(await messages(comm, 2)) == [7, 8]
    await comm.receive_nothing(QUIET)

    await send(comm, {"type": "ack", "seq": 8})
    assert seqs(await messages(comm, 2)) == [9, 10]
    await comm.receive_nothing(QUIET)


async def test_live_deliveries_are_pushed_only_within_the_window(ws, settings):
    settings.TRANSPORT_WS_WINDOW = 3
    comm = await ws()
    session = await hello(comm)

    await queue(session["session_id"], 10)

    assert seqs(await messages(comm, 3)) == [1, 2, 3]
    await comm.receive_nothing(QUIET)
    await send(comm, {"type": "ack", "seq": 3})
    assert seqs(await messages(comm, 3)) == [4, 5, 6]
    await comm.receive_nothing(QUIET)


# --- ephemeral messages -----------------------------------------------------


async def test_an_ephemeral_message_reaches_a_connected_session(ws):
    comm = await ws()
    session = await hello(comm)

    seq = await deliver(session["session_id"], "typing", {"user": 7}, durable=False)

    frame = await recv(comm)
    assert frame["seq"] == seq == 1
    assert frame["message_type"] == "typing"
    assert frame["payload"] == {"user": 7}


async def test_an_ephemeral_message_to_an_offline_session_is_not_stored(ws):
    session = await offline_session(ws)

    seq = await deliver(session["session_id"], "typing", {"user": 7}, durable=False)

    assert seq is None
    assert await stored(session["session_id"]) == []
    comm = await ws()
    welcome = await hello(comm, token=session["token"], after=0)
    assert welcome["next_seq"] == 1
    await comm.receive_nothing(QUIET)


async def test_an_unacked_ephemeral_message_is_not_redelivered_after_reconnect(ws):
    comm = await ws()
    session = await hello(comm)
    await deliver(session["session_id"], "typing", {"user": 7}, durable=False)
    await deliver(session["session_id"], "order.shipped", {"order": 42})
    await messages(comm, 2)
    await comm.disconnect()

    again = await ws()
    await hello(again, token=session["token"])

    frames = await messages(again, 1)
    assert [(m["seq"], m["message_type"]) for m in frames] == [(2, "order.shipped")]
    await again.receive_nothing(QUIET)


# --- action idempotency -----------------------------------------------------


@pytest.fixture
def counted(actions: Callable[..., None]) -> list[Payload]:
    """Register `test.count`, which records each call and answers its number."""
    calls: list[Payload] = []

    async def count(ctx: ActionContext, payload: Payload) -> Payload:
        calls.append(payload)
        # Long enough that a retry sent right after finds this run unfinished.
        await asyncio.sleep(0.1)
        return {"calls": len(calls)}

    actions("test.count", count)
    return calls


def count_action(action_id: str, **payload: Any) -> dict[str, Any]:
    return {"type": "action", "id": action_id, "action": "test.count", "payload": payload}


async def test_the_same_action_id_twice_runs_the_handler_once(ws, counted):
    comm = await ws()
    await hello(comm)

    await send(comm, count_action("r1"))
    first = await recv(comm)
    await send(comm, count_action("r1"))
    second = await recv(comm)

    assert first == second == {"type": "reply", "id": "r1", "ok": True, "payload": {"calls": 1}}
    assert len(counted) == 1


async def test_a_retry_sent_while_the_first_runs_gets_the_same_reply(ws, counted):
    comm = await ws()
    await hello(comm)

    await send(comm, count_action("r1"))
    await send(comm, count_action("r1"))

    replies = [await recv(comm), await recv(comm)]
    assert (
        replies[0]
        == replies[1]
        == {"type": "reply", "id": "r1", "ok": True, "payload": {"calls": 1}}
    )
    assert len(counted) == 1


async def test_the_same_action_id_on_another_connection_of_the_session_runs_once(ws, counted):
    comm = await ws()
    session = await hello(comm)
    await send(comm, count_action("r1"))
    first = await recv(comm)
    await comm.disconnect()

    again = await ws()
    await hello(again, token=session["token"])
    await send(again, count_action("r1"))

    assert await recv(again) == first
    assert len(counted) == 1


async def test_a_different_action_id_runs_the_handler_again(ws, counted):
    comm = await ws()
    await hello(comm)

    await send(comm, count_action("r1"))
    await recv(comm)
    await send(comm, count_action("r2"))

    assert (await recv(comm))["payload"] == {"calls": 2}


# --- sessions are isolated --------------------------------------------------


async def test_a_sessions_token_resumes_only_its_own_mailbox(ws):
    alice = await offline_session(ws)
    bob = await offline_session(ws)
    await deliver(alice["session_id"], "for.alice", {})
    await deliver(bob["session_id"], "for.bob", {})

    comm = await ws()
    welcome = await hello(comm, token=alice["token"], after=0)

    assert welcome["session_id"] == alice["session_id"]
    assert [m["message_type"] for m in await messages(comm, 1)] == ["for.alice"]
    await comm.receive_nothing(QUIET)
    assert await stored(bob["session_id"]) == [1]


async def test_a_message_pushed_to_one_session_never_reaches_another(ws):
    alice = await ws()
    bob = await ws()
    alice_session = await hello(alice)
    await hello(bob)

    await deliver(alice_session["session_id"], "private", {})

    assert (await recv(alice))["message_type"] == "private"
    await bob.receive_nothing(QUIET)


async def test_an_action_id_of_one_session_is_no_key_to_another_sessions_reply(ws, counted):
    alice = await ws()
    bob = await ws()
    await hello(alice)
    await hello(bob)

    await send(alice, count_action("r1", who="alice"))
    await recv(alice)
    await send(bob, count_action("r1", who="bob"))

    assert (await recv(bob))["payload"] == {"calls": 2}
    assert counted == [{"who": "alice"}, {"who": "bob"}]


async def test_an_ack_acknowledges_only_the_own_sessions_messages(ws):
    bob = await offline_session(ws)
    await queue(bob["session_id"], 3)
    alice = await ws()
    await hello(alice)

    await send(alice, {"type": "ack", "seq": 3})
    await settled(alice)

    assert await stored(bob["session_id"]) == [1, 2, 3]


async def test_a_late_reply_reaches_only_the_session_that_sent_the_action(ws, actions, settings):
    settings.TRANSPORT_ACTION_TIMEOUT = 0.2
    release = asyncio.Event()

    async def late(ctx: ActionContext, payload: Payload) -> Payload:
        await release.wait()
        return {"late": True}

    actions("late", late)
    alice, bob = await ws(), await ws()
    await hello(alice)
    await hello(bob)
    await send(alice, {"type": "action", "id": "r1", "action": "late"})
    assert (await recv(alice))["error"]["code"] == "timeout"

    release.set()

    assert (await recv(alice))["message_type"] == "reply"
    await bob.receive_nothing(QUIET)


# --- signals ----------------------------------------------------------------


async def test_session_opened_and_closed_fire_with_transport_ws(ws, events):
    comm = await ws()
    session = await hello(comm)
    opened = named(events, "session_opened")
    assert opened == [{"session_id": session["session_id"], "transport": "ws"}]

    await comm.disconnect()

    assert {"session_id": session["session_id"], "transport": "ws"} in named(
        events, "session_closed"
    )


async def test_action_received_and_answered_fire_with_their_labels(ws, events):
    comm = await ws()
    session = await hello(comm)

    await send(comm, {"type": "action", "id": "r1", "action": "echo", "payload": {}})
    await recv(comm)
    await send(comm, {"type": "action", "id": "r2", "action": "no.such", "payload": {}})
    await recv(comm)

    received = named(events, "action_received")
    assert [(e["action"], e["transport"], e["session_id"]) for e in received] == [
        ("echo", "ws", session["session_id"]),
        ("unknown", "ws", session["session_id"]),
    ]
    answered = named(events, "action_answered")
    assert [(e["action"], e["transport"], e["ok"]) for e in answered] == [
        ("echo", "ws", True),
        ("unknown", "ws", False),
    ]
    assert all(e["duration_ms"] >= 0 for e in answered)


async def test_message_enqueued_and_messages_delivered_fire_for_a_push(ws, events):
    comm = await ws()
    session = await hello(comm)

    await deliver(session["session_id"], "order.shipped", {"order": 42})
    await recv(comm)

    enqueued = named(events, "message_enqueued")
    assert enqueued == [
        {
            "session_id": session["session_id"],
            "seq": 1,
            "message_type": "order.shipped",
            "source": "system",
            "durable": True,
        }
    ]
    delivered = named(events, "messages_delivered")
    assert delivered == [
        {
            "session_id": session["session_id"],
            "transport": "ws",
            "messages": [(1, "order.shipped")],
        }
    ]


async def test_messages_dropped_fires_with_reason_overflow(ws, events, settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 2
    session = await offline_session(ws)

    await queue(session["session_id"], 3)

    dropped = named(events, "messages_dropped")
    assert dropped == [
        {
            "session_id": session["session_id"],
            "reason": "overflow",
            "count": 1,
            "message_type": "note",
        }
    ]


async def test_messages_dropped_fires_with_reason_transport_closed_for_an_offline_session(
    ws, events
):
    session = await offline_session(ws)

    await deliver(session["session_id"], "typing", {}, durable=False)

    dropped = named(events, "messages_dropped")
    assert [(e["reason"], e["count"], e["message_type"]) for e in dropped] == [
        ("transport-closed", 1, "typing")
    ]


async def test_messages_dropped_fires_with_reason_transport_closed_when_the_socket_closes(
    ws, events
):
    comm = await ws()
    session = await hello(comm)
    await deliver(session["session_id"], "typing", {}, durable=False)
    await recv(comm)
    assert named(events, "messages_dropped") == []

    await comm.disconnect()

    dropped = named(events, "messages_dropped")
    assert [(e["reason"], e["count"], e["session_id"]) for e in dropped] == [
        ("transport-closed", 1, session["session_id"])
    ]


async def test_a_rate_limited_socket_fires_rate_limited(ws, events, use_rate_limits):
    use_rate_limits("ws=1/m")
    await ws("192.0.2.10")

    comm = await ws("192.0.2.11")
    await closed(comm)

    limited = named(events, "rate_limited")
    assert [(e["transport"], e["network"]) for e in limited] == [("ws", "192.0.2.0/24")]


async def test_a_malformed_frame_fires_bad_input(ws, events):
    comm = await ws()
    session = await hello(comm)

    await send(comm, "not json")
    await recv(comm)

    bad = named(events, "bad_input")
    assert bad == [
        {"session_id": session["session_id"], "transport": "ws", "code": "invalid_json"}
    ]


async def test_one_renewal_keeps_every_open_session_on_ws_until_it_closes(ws):
    # Two welcomed connections whose leases have just run out. Connections
    # of earlier tests that the test loop never closed may still be held.
    held_before = set(leases.open)
    first, second = await ws(), await ws()
    ids = [(await hello(first))["session_id"], (await hello(second))["session_id"]]
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Mailbox.objects.filter(session_id__in=ids).update)(ws_until=past)

    # One renewal of what the process holds open puts both back on `ws`.
    await sync_to_async(store.ws_renewed)(*leases.open)
    boxes = await sync_to_async(lambda: list(Mailbox.objects.filter(session_id__in=ids)))()
    now = timezone.now()

    assert set(leases.open) - held_before == set(ids)
    assert [store.transport_of(box, now) for box in boxes] == ["ws", "ws"]

    await first.disconnect()
    assert set(leases.open) - held_before == set(ids[1:])
