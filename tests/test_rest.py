"""The REST long-poll transport, spoken through Django's AsyncClient.

Each row of the protocol's REST table, each error status, the isolation of
one session's mailbox from another's, and the signals telemetry is built on.
"""

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.core.signals import request_finished
from django.db.models import F
from django.test import AsyncClient, override_settings
from django.utils import timezone

from config.asgi import application
from mailbox.api import deliver
from mailbox.models import Mailbox
from mailbox.wakeup import hub
from tests.helpers import Server, fields, migrated_sqlite, recording
from transport import registry, signals, tokens
from transport.registry import ActionContext, Payload

pytestmark = pytest.mark.django_db(transaction=True)

adeliver = sync_to_async(deliver)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_session(client: AsyncClient) -> dict[str, Any]:
    response = await client.post("/transport/sessions")
    assert response.status_code == 201, response.content
    body: dict[str, Any] = response.json()
    return body


async def post(client: AsyncClient, path: str, body: Any, token: str | None = None) -> Any:
    """POST a body (a str or bytes is sent as is, anything else as JSON)."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = bearer(token) if token else {}
    return await client.post(path, data=data, content_type="application/json", headers=headers)


async def get(client: AsyncClient, path: str, token: str) -> Any:
    return await client.get(path, headers=bearer(token))


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


@pytest.fixture
def client() -> AsyncClient:
    return AsyncClient()


@pytest.fixture
def handlers() -> Iterator[Callable[[str, registry.Handler], None]]:
    """Return a function that registers an action handler for this test only."""
    added: list[str] = []

    def add(name: str, handler: registry.Handler) -> None:
        registry.register(name, handler)
        added.append(name)

    yield add
    for name in added:
        registry._handlers.pop(name, None)


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- Sessions ----------------------------------------------------------------


async def test_it_creates_a_session_with_a_token_and_next_seq_one(client):
    body = await open_session(client)

    assert set(body) == {"session_id", "token", "next_seq"}
    assert body["session_id"].startswith("s_")
    assert body["next_seq"] == 1
    assert tokens.session_of(body["token"]) == body["session_id"]
    assert await Mailbox.objects.filter(session_id=body["session_id"]).aexists()


async def test_each_new_session_is_a_different_one(client):
    first, second = await open_session(client), await open_session(client)

    assert first["session_id"] != second["session_id"]
    assert first["token"] != second["token"]


# --- Actions -----------------------------------------------------------------


async def test_it_answers_an_action_with_its_reply(client):
    session = await open_session(client)

    response = await post(
        client,
        "/transport/actions",
        {"id": "a1", "action": "echo", "payload": {"x": 1}},
        session["token"],
    )

    assert response.status_code == 200
    assert response.json() == {"type": "reply", "id": "a1", "ok": True, "payload": {"x": 1}}


async def test_it_answers_an_unknown_action_with_an_error_reply(client):
    session = await open_session(client)

    frame = {"id": 7, "action": "no.such", "payload": {}}

    response = await post(client, "/transport/actions", frame, session["token"])

    assert response.status_code == 200
    reply = response.json()
    assert reply["ok"] is False
    assert reply["id"] == 7
    assert reply["error"]["code"] == "unknown_action"


async def test_it_runs_an_action_id_once_and_answers_a_retry_with_the_first_reply(
    client, handlers
):
    calls: list[Payload] = []

    def count(ctx: ActionContext, payload: Payload) -> Payload:
        calls.append(payload)
        return {"calls": len(calls)}

    handlers("test.count", count)
    session = await open_session(client)
    frame = {"id": "once", "action": "test.count", "payload": {}}

    first = await post(client, "/transport/actions", frame, session["token"])
    again = await post(client, "/transport/actions", frame, session["token"])

    assert first.status_code == again.status_code == 200
    assert first.json() == {"type": "reply", "id": "once", "ok": True, "payload": {"calls": 1}}
    assert again.json() == first.json()
    assert len(calls) == 1

    # Another id is another action: the handler runs again.
    other = await post(client, "/transport/actions", {**frame, "id": "twice"}, session["token"])
    assert other.json()["payload"] == {"calls": 2}


async def test_a_late_reply_is_answered_202_then_delivered_to_the_mailbox(
    client, handlers, settings
):
    settings.TRANSPORT_ACTION_TIMEOUT = 0.3

    async def slow(ctx: ActionContext, payload: Payload) -> Payload:
        await asyncio.sleep(1.0)
        return {"done": payload["n"]}

    handlers("test.slow", slow)
    session = await open_session(client)
    frame = {"id": "slow-1", "action": "test.slow", "payload": {"n": 5}}

    response = await post(client, "/transport/actions", frame, session["token"])
    assert response.status_code == 202
    assert response.json() == {"id": "slow-1", "status": "pending"}

    poll = await get(client, "/transport/poll?after=0&timeout=20", session["token"])
    body = poll.json()
    assert [m["message_type"] for m in body["messages"]] == ["reply"]
    assert body["messages"][0]["payload"] == {
        "type": "reply",
        "id": "slow-1",
        "ok": True,
        "payload": {"done": 5},
    }

    # A retry after the late reply gets it at once, without running again.
    retry = await post(client, "/transport/actions", frame, session["token"])
    assert retry.status_code == 200
    assert retry.json()["payload"] == {"done": 5}


# --- Long-poll -----------------------------------------------------------------


async def test_a_poll_answers_at_once_when_a_message_is_queued(client):
    session = await open_session(client)
    seq = await adeliver(session["session_id"], "order.shipped", {"order": 42})

    started = time.monotonic()
    response = await get(client, "/transport/poll?after=0&timeout=30", session["token"])

    assert time.monotonic() - started < 10
    assert response.status_code == 200
    body = response.json()
    assert body["gap"] is False
    assert body["next_after"] == seq == 1
    [message] = body["messages"]
    assert set(message) == {"seq", "message_type", "payload", "sent_at"}
    assert message["seq"] == 1
    assert message["message_type"] == "order.shipped"
    assert message["payload"] == {"order": 42}
    assert message["sent_at"].endswith("Z")


async def test_a_parked_poll_is_woken_by_a_later_deliver(client, settings):
    # The database watcher would also wake the poll; make it far too slow to
    # be what answers, so only the in-process wake-up can.
    settings.TRANSPORT_CROSS_PROCESS_POLL = 60
    session = await open_session(client)
    sid = session["session_id"]

    started = time.monotonic()
    poll = asyncio.ensure_future(
        get(client, "/transport/poll?after=0&timeout=30", session["token"])
    )
    await until(lambda: sid in hub._waiters)
    assert not poll.done()

    await adeliver(sid, "chat.message", {"text": "hi"})
    response = await asyncio.wait_for(poll, 15)

    assert time.monotonic() - started < 15
    assert [m["payload"] for m in response.json()["messages"]] == [{"text": "hi"}]


async def test_a_poll_answers_an_empty_list_after_its_timeout(client):
    session = await open_session(client)

    started = time.monotonic()
    response = await get(client, "/transport/poll?after=0&timeout=0.5", session["token"])
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.json() == {"messages": [], "next_after": 0, "gap": False}
    assert 0.4 <= elapsed < 10


async def test_a_poll_timeout_above_the_configured_maximum_is_capped(client, settings):
    settings.TRANSPORT_POLL_TIMEOUT_MAX = 0.5
    session = await open_session(client)

    for query in ("timeout=3600", ""):
        started = time.monotonic()
        response = await get(client, f"/transport/poll?after=0&{query}", session["token"])

        assert response.status_code == 200
        assert response.json()["messages"] == []
        assert time.monotonic() - started < 10


async def test_a_poll_after_n_acknowledges_every_seq_up_to_n(client):
    session = await open_session(client)
    for n in (1, 2, 3):
        await adeliver(session["session_id"], "n", {"n": n})

    response = await get(client, "/transport/poll?after=2&timeout=0", session["token"])
    assert [m["seq"] for m in response.json()["messages"]] == [3]

    # 1 and 2 are gone for good: even a cursor at 0 no longer sees them.
    again = await get(client, "/transport/poll?after=0&timeout=0", session["token"])
    assert [m["seq"] for m in again.json()["messages"]] == [3]


async def test_next_after_is_the_last_seq_returned_or_the_end_of_the_mailbox(client):
    session = await open_session(client)
    for n in range(5):
        await adeliver(session["session_id"], "n", {"n": n})

    page = await get(client, "/transport/mailbox?after=0&limit=2", session["token"])
    assert page.json()["next_after"] == 2

    rest = await get(client, "/transport/poll?after=2&timeout=0", session["token"])
    assert [m["seq"] for m in rest.json()["messages"]] == [3, 4, 5]
    assert rest.json()["next_after"] == 5

    # Everything acknowledged: an old cursor is told to move to the end.
    ack = await post(client, "/transport/ack", {"seq": 5}, session["token"])
    assert ack.status_code == 204
    empty = await get(client, "/transport/poll?after=0&timeout=0", session["token"])
    assert empty.json() == {"messages": [], "next_after": 5, "gap": False}


async def test_a_poll_reports_a_gap_after_an_overflow_dropped_unread_messages(client, settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 2
    session = await open_session(client)
    for n in (1, 2, 3):
        await adeliver(session["session_id"], "n", {"n": n})

    response = await get(client, "/transport/poll?after=0&timeout=0", session["token"])
    body = response.json()
    assert body["gap"] is True
    assert [m["seq"] for m in body["messages"]] == [2, 3]
    assert body["next_after"] == 3

    # Once the client has moved past the loss, the gap is no longer reported.
    later = await get(client, "/transport/poll?after=3&timeout=0", session["token"])
    assert later.json()["gap"] is False


@pytest.mark.parametrize(
    "query",
    [
        "after=abc",
        "after=1.5",
        "after=-1",
        "timeout=soon",
        "timeout=-1",
        "timeout=nan",
        "timeout=inf",
        "timeout=null",
        "timeout=",
    ],
)
async def test_a_poll_with_a_non_numeric_or_negative_parameter_is_refused(client, query):
    session = await open_session(client)

    response = await get(client, f"/transport/poll?{query}", session["token"])

    assert_error(response, 400)


# --- Mailbox pull ------------------------------------------------------------


async def test_a_mailbox_read_never_waits(client):
    session = await open_session(client)

    started = time.monotonic()
    response = await get(client, "/transport/mailbox?after=0", session["token"])

    assert response.status_code == 200
    assert response.json() == {"messages": [], "next_after": 0, "gap": False}
    assert time.monotonic() - started < 5


async def test_a_mailbox_read_returns_at_most_limit_messages(client):
    session = await open_session(client)
    for n in range(4):
        await adeliver(session["session_id"], "n", {"n": n})

    first = await get(client, "/transport/mailbox?after=0&limit=3", session["token"])
    assert [m["seq"] for m in first.json()["messages"]] == [1, 2, 3]

    second = await get(client, "/transport/mailbox?after=3&limit=3", session["token"])
    assert [m["seq"] for m in second.json()["messages"]] == [4]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "many"])
async def test_a_mailbox_limit_out_of_bounds_is_refused(client, limit):
    session = await open_session(client)

    response = await get(client, f"/transport/mailbox?limit={limit}", session["token"])

    assert_error(response, 400)


# --- Ack -------------------------------------------------------------------------


async def test_an_ack_answers_204_and_acknowledges_cumulatively(client):
    session = await open_session(client)
    for n in range(3):
        await adeliver(session["session_id"], "n", {"n": n})

    response = await post(client, "/transport/ack", {"seq": 2}, session["token"])

    assert response.status_code == 204
    assert response.content == b""
    left = await get(client, "/transport/mailbox?after=0", session["token"])
    assert [m["seq"] for m in left.json()["messages"]] == [3]


@pytest.mark.parametrize(
    "body", ['{"seq": 0}', '{"seq": -3}', '{"seq": "2"}', '{"seq": 1.5}', "{}", "[2]", "2", "{"]
)
async def test_an_ack_with_a_bad_seq_is_refused(client, body):
    session = await open_session(client)

    response = await post(client, "/transport/ack", body, session["token"])

    assert_error(response, 400)


# --- Errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "{",
        b"\xff\xfe",
        "",
        "[1, 2]",
        '"echo"',
        "null",
        '{"id": "a", "action": 5}',
        '{"id": "a", "action": "echo", "payload": [1]}',
        '{"id": [], "action": "echo"}',
        '{"id": "", "action": "echo"}',
        '{"action": "echo"}',
    ],
)
async def test_a_malformed_action_body_is_answered_400(client, body):
    session = await open_session(client)

    response = await post(client, "/transport/actions", body, session["token"])

    assert_error(response, 400)


async def test_invalid_json_has_its_own_error_code(client):
    session = await open_session(client)

    response = await post(client, "/transport/actions", "{not json", session["token"])

    assert_error(response, 400, "invalid_json")


def _forgeries(token: str, other_session_id: str) -> dict[str, dict[str, str]]:
    """Return Authorization headers that must all be refused, by name."""
    session_id, _, signature = token.partition(":")
    with override_settings(SECRET_KEY="some other deployment's key"):
        foreign = tokens.issue(session_id)
    return {
        "missing": {},
        "empty": {"Authorization": ""},
        "no token": {"Authorization": "Bearer "},
        "other scheme": {"Authorization": f"Basic {token}"},
        "tampered": {"Authorization": f"Bearer {token[:-1]}{'A' if token[-1] != 'A' else 'B'}"},
        "truncated": {"Authorization": f"Bearer {token[:-6]}"},
        "session swapped": {"Authorization": f"Bearer {other_session_id}:{signature}"},
        "other key": {"Authorization": f"Bearer {foreign}"},
        "garbage": {"Authorization": "Bearer not-a-token"},
    }


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/transport/poll?timeout=0"),
        ("get", "/transport/mailbox"),
        ("post", "/transport/ack"),
        ("post", "/transport/actions"),
    ],
)
async def test_a_missing_or_forged_token_is_answered_401(client, method, path):
    victim, other = await open_session(client), await open_session(client)
    body = {"seq": 1} if path.endswith("ack") else {"id": 1, "action": "echo"}

    for name, headers in _forgeries(victim["token"], other["session_id"]).items():
        if method == "get":
            response = await client.get(path, headers=headers)
        else:
            response = await client.post(
                path, data=json.dumps(body), content_type="application/json", headers=headers
            )
        assert response.status_code == 401, name
        assert_error(response, 401, "invalid_token")


async def test_an_expired_token_is_answered_401(client, settings):
    session = await open_session(client)
    # Accepted once, so its signature check is remembered; its age is not.
    assert (await get(client, "/transport/mailbox", session["token"])).status_code == 200
    settings.TRANSPORT_TOKEN_MAX_AGE = -1

    response = await get(client, "/transport/mailbox", session["token"])

    assert_error(response, 401, "invalid_token")


@pytest.mark.parametrize("ending", ["removed", "expired"])
async def test_a_valid_token_of_a_session_that_is_gone_is_answered_404(client, ending):
    session = await open_session(client)
    token = session["token"]
    answered = {"id": "r1", "action": "echo", "payload": {}}
    assert (await post(client, "/transport/actions", answered, token)).status_code == 200
    rows = Mailbox.objects.filter(session_id=session["session_id"])
    if ending == "removed":
        await rows.adelete()
    else:
        await rows.aupdate(expires_at=timezone.now() - timedelta(seconds=1))

    for response in (
        await get(client, "/transport/poll?timeout=0", token),
        await get(client, "/transport/mailbox", token),
        await post(client, "/transport/ack", {"seq": 1}, token),
        await post(client, "/transport/actions", {"id": 1, "action": "echo"}, token),
        # A retry of an answered action, and an action nobody registered.
        await post(client, "/transport/actions", answered, token),
        await post(client, "/transport/actions", {"id": 2, "action": "no.such"}, token),
    ):
        assert_error(response, 404, "no_such_session")


async def test_a_body_over_the_frame_limit_is_answered_413(client, settings):
    settings.TRANSPORT_MAX_FRAME_BYTES = 256
    session = await open_session(client)
    frame = {"id": 1, "action": "echo", "payload": {"blob": "x" * 1000}}

    response = await post(client, "/transport/actions", frame, session["token"])

    assert_error(response, 413, "too_large")

    # A body within the limit still goes through.
    small = await post(client, "/transport/actions", {"id": 2, "action": "echo"}, session["token"])
    assert small.status_code == 200


async def test_requests_over_the_rate_limit_are_answered_429_with_retry_after(
    client, use_rate_limits
):
    use_rate_limits("rest=3/s")

    with recording(signals.rate_limited) as (limited,):
        answers = [await client.post("/transport/sessions") for _ in range(4)]

    assert [r.status_code for r in answers[:3]] == [201, 201, 201]
    assert_error(answers[3], 429, "rate_limited")
    assert int(answers[3].headers["Retry-After"]) >= 1
    assert fields(limited, "transport", "network", "retry_after") == [
        {
            "transport": "rest",
            "network": "127.0.0.0/24",
            "retry_after": int(answers[3].headers["Retry-After"]),
        }
    ]


@pytest.mark.process
def test_an_unreachable_database_is_answered_503(tmp_path: Path):
    # A real server on its own SQLite file: the file is then replaced by a
    # directory, so every new connection fails as a lost database would. A
    # kept connection would go on with the moved file, so none is kept.
    db = tmp_path / "db.sqlite3"
    env = {**migrated_sqlite(db), "DATABASE_CONN_MAX_AGE": "0"}
    server = Server({**env, "SERVER_LOG": str(tmp_path / "server.log")}).start()
    try:
        session = requests.post(f"{server.url}/transport/sessions", timeout=10).json()
        for path in tmp_path.glob("db.sqlite3*"):
            shutil.move(path, tmp_path / f"moved-{path.name}")
        db.mkdir()

        headers = bearer(session["token"])
        for response in (
            requests.get(f"{server.url}/transport/mailbox", headers=headers, timeout=30),
            requests.post(f"{server.url}/transport/sessions", timeout=30),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "unavailable"
    finally:
        server.stop()


# --- Isolation -----------------------------------------------------------------


async def test_one_sessions_token_never_reads_polls_or_acks_anothers_mailbox(client):
    alice, bob = await open_session(client), await open_session(client)
    for n in (1, 2, 3):
        await adeliver(bob["session_id"], "secret", {"n": n})

    polled = await get(client, "/transport/poll?after=0&timeout=0", alice["token"])
    read = await get(client, "/transport/mailbox?after=0", alice["token"])
    acked = await post(client, "/transport/ack", {"seq": 3}, alice["token"])
    past = await get(client, "/transport/poll?after=3&timeout=0", alice["token"])

    assert polled.json()["messages"] == read.json()["messages"] == past.json()["messages"] == []
    assert acked.status_code == 204

    # Bob still has all three: nothing Alice did touched his mailbox.
    mine = await get(client, "/transport/mailbox?after=0", bob["token"])
    assert [m["payload"]["n"] for m in mine.json()["messages"]] == [1, 2, 3]


async def test_an_action_id_of_one_session_is_no_key_to_another_sessions_reply(client):
    alice, bob = await open_session(client), await open_session(client)

    await post(client, "/transport/actions", echo("r1", who="alice"), alice["token"])
    reply = await post(client, "/transport/actions", echo("r1", who="bob"), bob["token"])

    assert reply.json()["payload"] == {"who": "bob"}


def echo(action_id: str, **payload: Any) -> dict[str, Any]:
    return {"id": action_id, "action": "echo", "payload": payload}


# --- Signals -----------------------------------------------------------------


async def test_a_poll_reports_its_outcome_messages_or_timeout(client):
    session = await open_session(client)
    sid = session["session_id"]

    with recording(signals.poll_completed) as (polls,):
        await get(client, "/transport/poll?after=0&timeout=0.2", session["token"])
        await adeliver(sid, "n", {})
        await get(client, "/transport/poll?after=0&timeout=5", session["token"])

    assert [(p["session_id"], p["outcome"]) for p in polls] == [
        (sid, "timeout"),
        (sid, "messages"),
    ]
    assert polls[0]["duration_ms"] >= 150
    assert all(p["duration_ms"] >= 0 for p in polls)


async def test_a_poll_whose_session_expires_while_parked_reports_an_error(client, settings):
    settings.TRANSPORT_CROSS_PROCESS_POLL = 0.05
    session = await open_session(client)
    sid = session["session_id"]

    with recording(signals.poll_completed) as (polls,):
        poll = asyncio.ensure_future(
            get(client, "/transport/poll?after=0&timeout=30", session["token"])
        )
        await until(lambda: sid in hub._waiters)

        # The session expires just as another process allocates a seq for it:
        # the database watcher wakes the poll, whose next fetch finds no session.
        await Mailbox.objects.filter(session_id=sid).aupdate(
            expires_at=timezone.now() - timedelta(seconds=1), last_seq=F("last_seq") + 1
        )
        response = await asyncio.wait_for(poll, 25)

    assert_error(response, 404, "no_such_session")
    assert [(p["session_id"], p["outcome"]) for p in polls] == [(sid, "error")]


async def test_a_poll_abandoned_by_its_client_releases_its_waiter_and_is_no_error(client):
    session = await open_session(client)
    sid = session["session_id"]

    with recording(signals.poll_completed) as (polls,):
        poll = asyncio.ensure_future(
            get(client, "/transport/poll?after=0&timeout=30", session["token"])
        )
        await until(lambda: sid in hub._waiters)

        # Django cancels a view whose client disconnects; so does this.
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll

    assert sid not in hub._waiters
    # A client going away is not a failed poll: the success rate ignores it.
    assert [p["outcome"] for p in polls if p["outcome"] == "error"] == []


async def test_the_first_poll_opens_the_session_on_the_rest_transport(client):
    session = await open_session(client)
    sid = session["session_id"]

    with recording(signals.session_opened, signals.session_closed) as (opened, closed):
        await get(client, "/transport/poll?after=0&timeout=0", session["token"])
        await get(client, "/transport/poll?after=0&timeout=0", session["token"])

    # The second poll comes within the idle window: still the same session.
    assert fields(opened, "session_id", "transport") == [{"session_id": sid, "transport": "rest"}]
    assert fields(closed, "session_id", "transport") == [
        {"session_id": sid, "transport": "mailbox"}
    ]


async def test_every_response_body_sent_is_counted_in_bytes(client):
    with recording(signals.payload_sent) as (sent,):
        created = await client.post("/transport/sessions")
        token = created.json()["token"]
        polled = await get(client, "/transport/poll?timeout=0", token)
        acked = await post(client, "/transport/ack", {"seq": 1}, token)
        refused = await get(client, "/transport/mailbox", "forged")

    assert fields(sent, "transport", "size") == [
        {"transport": "rest", "size": len(created.content)},
        {"transport": "rest", "size": len(polled.content)},
        {"transport": "rest", "size": len(acked.content)},
        {"transport": "rest", "size": len(refused.content)},
    ]
    assert sent[0]["size"] > 0 and sent[1]["size"] > 0 and sent[3]["size"] > 0


async def test_an_api_response_is_closed_on_the_event_loop_and_a_site_page_in_a_thread():
    # request_finished runs where the response is closed: for the API, on
    # the loop itself; for the site, whose receivers may use the database,
    # in a thread.
    closed_in: list[threading.Thread] = []

    def on_finished(sender: Any, **kwargs: Any) -> None:
        closed_in.append(threading.current_thread())

    request_finished.connect(on_finished)
    try:
        for path in ("/healthz", "/transport/demo/"):
            communicator = HttpCommunicator(
                application, "GET", path, headers=[(b"host", b"127.0.0.1")]
            )
            response = await communicator.get_response()
            await communicator.wait()
            assert response["status"] == 200, path
    finally:
        request_finished.disconnect(on_finished)

    assert closed_in[0] is threading.current_thread()
    assert len(closed_in) == 2 and closed_in[1] is not threading.current_thread()


def test_the_apis_request_headers_read_meta_as_djangos_do(rf):
    from django.http.request import HttpHeaders

    from transport.http import LazyHeaders

    meta = rf.post(
        "/transport/actions",
        b"{}",
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer t",
        HTTP_X_REQUEST_ID="r-1",
    ).META
    lazy, eager = LazyHeaders(meta), HttpHeaders(meta)

    # Django's own also takes "_" for "-".
    for name in ("Authorization", "authorization", "X-Request-Id", "X_Request_Id", "content_type"):
        assert lazy[name] == eager[name], name
    assert lazy.get("Content-Length") == eager.get("Content-Length") == "2"
    assert lazy.get("X-Missing") is None and "X-Missing" not in lazy
    with pytest.raises(KeyError):
        lazy["X-Absent"]
    assert dict(lazy) == dict(eager) and len(lazy) == len(eager)
