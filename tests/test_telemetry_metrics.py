"""Every event of the telemetry plan, read back from the real /metrics page.

Traffic goes through the real ASGI application (WebSocket communicators and
Django's AsyncClient); each test scrapes /metrics before and after, and
checks what moved and with which labels. Counters live in the process's
registry and grow across tests, so tests compare deltas; gauges come from
the database, which each test starts empty, so they are compared as is.
"""

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from mailbox import expiry
from mailbox.api import deliver
from mailbox.models import Mailbox, Message
from telemetry.metrics import ip_bucket
from tests.helpers import hello, recv, send
from tests.scrape import FAMILIES, Scrape, delta, parse
from transport import registry
from transport.registry import ActionContext, Payload

pytestmark = pytest.mark.django_db(transaction=True)

adeliver = sync_to_async(deliver)


def _deliver_to_self(ctx: ActionContext, payload: Payload) -> Payload:
    """Deliver one message to the asking session, as a site's handler would."""
    return {"seq": deliver(ctx.session_id, "note", {"n": payload.get("n", 0)})}


registry.register("telemetry.notify", _deliver_to_self)


async def scrape(client: AsyncClient | None = None) -> Scrape:
    response = await (client or AsyncClient()).get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


async def open_session(client: AsyncClient) -> dict[str, Any]:
    response = await client.post("/transport/sessions")
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    return body


async def poll(client: AsyncClient, token: str, after: int = 0, timeout: float = 0) -> Any:
    return await client.get(
        f"/transport/poll?after={after}&timeout={timeout}",
        headers={"Authorization": f"Bearer {token}"},
    )


def sessions(page: Scrape) -> dict[str, float]:
    name = "transport_session_active_total"
    return {t: page.value(name, transport=t) for t in ("ws", "rest", "mailbox")}


async def test_every_family_is_exposed_from_startup_with_known_labels_at_zero():
    page = await scrape()

    for name, kind in FAMILIES.items():
        assert page.types.get(name) == kind, name
    for source in ("router", "system"):
        assert page.has("transport_mailbox_enqueue_total", source=source)
    for transport in ("ws", "rest", "mailbox"):
        assert page.has("transport_mailbox_delivery_total", transport=transport)
        assert page.has("transport_session_active_total", transport=transport)
    for reason in ("ttl", "overflow", "transport-closed"):
        assert page.has("transport_mailbox_drop_total", reason=reason)
    for outcome in ("messages", "timeout", "error"):
        assert page.has("transport_poll_duration_ms_count", outcome=outcome)
    assert page.has("transport_inbound_actions_total", transport="ws", action="echo")
    assert page.has("transport_dispatch_latency_ms_count", transport="rest", action="unknown")
    assert page.has("transport_rate_limit_trigger_total", transport="ws", ip_bucket="0")
    assert page.has("transport_mailbox_messages_queued", mailbox="_total")
    assert page.has("transport_mailbox_messages_queued_high_water_count")
    # django-prometheus's own families come with the same page.
    assert "django_http_requests_before_middlewares" in page.types


async def test_the_capacity_gauge_is_the_configured_capacity(settings):
    settings.TRANSPORT_MAILBOX_SESSIONS_CAPACITY = 1234

    page = await scrape()

    assert page.value("transport_mailbox_capacity_sessions") == 1234


async def test_a_websocket_session_moves_from_ws_to_mailbox_when_it_closes(ws):
    comm = await ws()
    await hello(comm)
    assert sessions(await scrape()) == {"ws": 1, "rest": 0, "mailbox": 0}

    await comm.disconnect()

    assert sessions(await scrape()) == {"ws": 0, "rest": 0, "mailbox": 1}


async def test_a_resumed_mailbox_session_moves_to_ws_and_back(ws):
    client = AsyncClient()
    session = await open_session(client)
    assert sessions(await scrape()) == {"ws": 0, "rest": 0, "mailbox": 1}

    comm = await ws()
    await hello(comm, token=session["token"], after=0)
    assert sessions(await scrape()) == {"ws": 1, "rest": 0, "mailbox": 0}

    await comm.disconnect()
    assert sessions(await scrape()) == {"ws": 0, "rest": 0, "mailbox": 1}


async def test_a_poll_client_is_on_rest_until_it_goes_quiet_past_the_idle_window(settings):
    settings.TRANSPORT_REST_IDLE = 0.5
    client = AsyncClient()
    session = await open_session(client)

    assert (await poll(client, session["token"])).status_code == 200
    assert sessions(await scrape()) == {"ws": 0, "rest": 1, "mailbox": 0}

    await asyncio.sleep(1.0)
    assert sessions(await scrape()) == {"ws": 0, "rest": 0, "mailbox": 1}


async def test_an_expired_session_leaves_every_transport(ws):
    comm = await ws()
    welcome = await hello(comm)
    await open_session(AsyncClient())

    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Mailbox.objects.update)(expires_at=past)

    assert sessions(await scrape()) == {"ws": 0, "rest": 0, "mailbox": 0}
    assert welcome["session_id"]


async def test_enqueues_count_by_source_router_and_system(ws):
    comm = await ws()
    session = await hello(comm)
    before = await scrape()

    await adeliver(session["session_id"], "news", {})
    await send(comm, {"type": "action", "id": "a1", "action": "telemetry.notify", "payload": {}})
    frames = [await recv(comm), await recv(comm), await recv(comm)]

    after = await scrape()
    assert delta(before, after, "transport_mailbox_enqueue_total", source="system") == 1
    assert delta(before, after, "transport_mailbox_enqueue_total", source="router") == 1
    assert {f["type"] for f in frames} == {"message", "reply"}


async def test_deliveries_count_by_the_transport_that_carried_them(ws):
    client = AsyncClient()
    rest = await open_session(client)
    pull = await open_session(client)
    comm = await ws()
    pushed = await hello(comm)
    for session_id in (rest["session_id"], pull["session_id"]):
        await adeliver(session_id, "news", {})
        await adeliver(session_id, "news", {})
    before = await scrape()

    await adeliver(pushed["session_id"], "news", {})
    assert (await recv(comm))["type"] == "message"
    assert len((await poll(client, rest["token"])).json()["messages"]) == 2
    mailbox = await client.get(
        "/transport/mailbox?after=0", headers={"Authorization": f"Bearer {pull['token']}"}
    )
    assert len(mailbox.json()["messages"]) == 2

    after = await scrape()
    assert delta(before, after, "transport_mailbox_delivery_total", transport="ws") == 1
    assert delta(before, after, "transport_mailbox_delivery_total", transport="rest") == 2
    assert delta(before, after, "transport_mailbox_delivery_total", transport="mailbox") == 2


async def test_overflow_and_transport_closed_drops_count_by_reason(settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 2
    session = await open_session(AsyncClient())
    before = await scrape()

    for n in range(3):
        await adeliver(session["session_id"], "news", {"n": n})
    assert await adeliver(session["session_id"], "typing", {}, durable=False) is None

    after = await scrape()
    assert delta(before, after, "transport_mailbox_drop_total", reason="overflow") == 1
    assert delta(before, after, "transport_mailbox_drop_total", reason="transport-closed") == 1
    assert delta(before, after, "transport_mailbox_drop_total", reason="ttl") == 0


async def _expire_queued(session_id: str) -> None:
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Message.objects.filter(mailbox_id=session_id).update)(expires_at=past)


async def test_a_fetch_meeting_expired_messages_counts_ttl_drops():
    client = AsyncClient()
    session = await open_session(client)
    await adeliver(session["session_id"], "news", {})
    await adeliver(session["session_id"], "news", {})
    await _expire_queued(session["session_id"])
    before = await scrape()

    body = (await poll(client, session["token"])).json()

    after = await scrape()
    assert body["messages"] == [] and body["gap"] is True
    assert delta(before, after, "transport_mailbox_drop_total", reason="ttl") == 2
    # The mailbox emptied by expiry: its high-water mark of 2 is observed.
    assert delta(before, after, "transport_mailbox_messages_queued_high_water_count") == 1
    assert delta(before, after, "transport_mailbox_messages_queued_high_water_sum") == 2


async def test_the_expiry_sweep_counts_ttl_drops_and_observes_the_high_water_mark():
    # The sweep `manage.py expire_mailboxes` runs; the command itself runs as
    # a real cron process in the multiprocess tests.
    session = await open_session(AsyncClient())
    for n in range(3):
        await adeliver(session["session_id"], "news", {"n": n})
    await _expire_queued(session["session_id"])
    before = await scrape()

    await sync_to_async(expiry.sweep)()

    after = await scrape()
    assert delta(before, after, "transport_mailbox_drop_total", reason="ttl") == 3
    assert delta(before, after, "transport_mailbox_messages_queued_high_water_sum") == 3


async def test_an_expired_session_swept_with_queued_messages_observes_its_high_water_mark():
    session = await open_session(AsyncClient())
    await adeliver(session["session_id"], "news", {})
    await adeliver(session["session_id"], "news", {})
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Mailbox.objects.update)(expires_at=past)
    before = await scrape()

    await sync_to_async(expiry.sweep)()

    after = await scrape()
    assert delta(before, after, "transport_mailbox_messages_queued_high_water_count") == 1
    assert delta(before, after, "transport_mailbox_messages_queued_high_water_sum") == 2
    assert delta(before, after, "transport_mailbox_drop_total", reason="ttl") == 2


async def test_a_mailbox_drained_by_acks_observes_its_high_water_mark():
    client = AsyncClient()
    session = await open_session(client)
    for n in range(3):
        await adeliver(session["session_id"], "news", {"n": n})
    before = await scrape()

    await poll(client, session["token"], after=3)

    after = await scrape()
    name = "transport_mailbox_messages_queued_high_water"
    assert delta(before, after, f"{name}_count") == 1
    assert delta(before, after, f"{name}_sum") == 3
    assert delta(before, after, f"{name}_bucket", le="2.0") == 0
    assert delta(before, after, f"{name}_bucket", le="5.0") == 1


async def test_the_queued_gauge_names_only_the_deepest_mailboxes_and_the_total(settings):
    settings.TRANSPORT_METRICS_TOP_K = 2
    client = AsyncClient()
    boxes = [await open_session(client) for _ in range(3)]
    for depth, box in enumerate(boxes, start=1):
        for n in range(depth):
            await adeliver(box["session_id"], "news", {"n": n})

    page = await scrape()

    name = "transport_mailbox_messages_queued"
    assert {s["mailbox"] for s in page.series(name)} == {
        boxes[1]["session_id"],
        boxes[2]["session_id"],
        "_total",
    }
    assert page.value(name, mailbox=boxes[2]["session_id"]) == 3
    assert page.value(name, mailbox="_total") == 6


async def test_actions_count_when_received_and_time_when_answered(ws):
    client = AsyncClient()
    rest = await open_session(client)
    comm = await ws()
    await hello(comm)
    before = await scrape()

    await send(comm, {"type": "action", "id": "a1", "action": "echo", "payload": {}})
    await send(comm, {"type": "action", "id": "a2", "action": "no.such", "payload": {}})
    replies = [await recv(comm), await recv(comm)]
    response = await client.post(
        "/transport/actions",
        data=json.dumps({"id": "r1", "action": "echo", "payload": {"x": 1}}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {rest['token']}"},
    )

    after = await scrape()
    assert {r["id"] for r in replies} == {"a1", "a2"} and response.status_code == 200
    received = "transport_inbound_actions_total"
    assert delta(before, after, received, transport="ws", action="echo") == 1
    assert delta(before, after, received, transport="ws", action="unknown") == 1
    assert delta(before, after, received, transport="rest", action="echo") == 1
    latency = "transport_dispatch_latency_ms_count"
    assert delta(before, after, latency, transport="ws", action="echo") == 1
    assert delta(before, after, latency, transport="ws", action="unknown") == 1
    assert delta(before, after, latency, transport="rest", action="echo") == 1
    assert delta(before, after, "transport_dispatch_latency_ms_sum", transport="ws", action="echo")
    assert delta(before, after, "transport_outbound_payload_bytes_count", transport="ws") == 2
    assert delta(before, after, "transport_outbound_payload_bytes_count", transport="rest") == 1


async def test_polls_count_by_outcome():
    client = AsyncClient()
    session = await open_session(client)
    before = await scrape()

    assert (await poll(client, session["token"], timeout=0.2)).json()["messages"] == []
    await adeliver(session["session_id"], "news", {})
    assert len((await poll(client, session["token"])).json()["messages"]) == 1

    # The session expires while the poll is parked: the poll ends in error.
    parked = asyncio.ensure_future(poll(client, session["token"], after=1, timeout=1))
    await asyncio.sleep(0.3)
    past = timezone.now() - timedelta(seconds=1)
    await sync_to_async(Mailbox.objects.update)(expires_at=past)
    answer = await parked
    assert answer.status_code == 404, answer.content

    after = await scrape()
    name = "transport_poll_duration_ms_count"
    assert delta(before, after, name, outcome="timeout") == 1
    assert delta(before, after, name, outcome="messages") == 1
    assert delta(before, after, name, outcome="error") == 1
    # A timed-out poll of 200 ms is counted below 250 ms, not in the first buckets.
    bucket = "transport_poll_duration_ms_bucket"
    assert delta(before, after, bucket, outcome="timeout", le="100.0") == 0
    assert delta(before, after, bucket, outcome="timeout", le="1000.0") == 1


async def test_rate_limits_count_by_transport_and_network_bucket(ws, use_rate_limits):
    use_rate_limits("ws=2/m,rest=1/m")
    client = AsyncClient()
    before = await scrape(client)

    comm = await ws()
    await hello(comm)
    await send(comm, {"type": "ping"})
    closed = await comm.receive_output(3)
    assert closed == {"type": "websocket.close", "code": 4429, "reason": closed["reason"]}
    assert (await client.post("/transport/sessions")).status_code == 201
    assert (await client.post("/transport/sessions")).status_code == 429

    after = await scrape(client)
    name = "transport_rate_limit_trigger_total"
    # AsyncClient and the communicators come from 127.0.0.1: network 127.0.0.0/24.
    bucket = ip_bucket("127.0.0.0/24")
    assert delta(before, after, name, transport="ws", ip_bucket=bucket) == 1
    assert delta(before, after, name, transport="rest", ip_bucket=bucket) == 1
    assert all("127.0.0" not in labels["ip_bucket"] for labels in after.series(name))


def _statements(rows: list[tuple[str]], fail: bool) -> None:
    from django.db import DatabaseError, connection

    table = Mailbox._meta.db_table
    with connection.cursor() as cursor:
        cursor.executemany(f"UPDATE {table} SET queued = queued WHERE session_id = %s", rows)
        cursor.execute("SELECT 1")
        if fail:
            with pytest.raises(DatabaseError):
                cursor.execute("SELECT * FROM no_such_table")


async def test_database_statements_are_counted_timed_and_their_errors_typed():
    from django.db import connection

    labels = {"alias": "default", "vendor": connection.vendor}
    before = await scrape()

    await sync_to_async(_statements)([("a",), ("b",), ("c",)], fail=True)

    after = await scrape()
    # Three rows of executemany, one SELECT, the failing one; the scrapes'
    # own gauge queries run in between, so at least these.
    assert delta(before, after, "django_db_execute_total", **labels) >= 5
    assert delta(before, after, "django_db_execute_many_total", **labels) == 3
    assert delta(before, after, "django_db_query_duration_seconds_count", **labels) >= 3
    errors = delta(before, after, "django_db_errors_total", type="OperationalError", **labels)
    # PostgreSQL raises ProgrammingError for a missing table.
    errors += delta(before, after, "django_db_errors_total", type="ProgrammingError", **labels)
    assert errors == 1


def _each(statements: list[tuple[str, list[Any]]]) -> list[int]:
    from django.db import connection

    with connection.cursor() as cursor:
        counts: list[int] = cursor.cursor.execute_each(statements)
    return counts


async def test_statements_run_each_give_their_rowcounts_and_count_as_executemany_does():
    from django.db import connection

    from mailbox.store import create_session

    box = await sync_to_async(create_session)()
    labels = {"alias": "default", "vendor": connection.vendor}
    touch = f"UPDATE {Mailbox._meta.db_table} SET queued = queued WHERE session_id = %s"
    before = await scrape()

    counts = await sync_to_async(_each)(
        [(touch, [box.session_id]), (touch, ["s_none"]), (touch, [box.session_id])]
    )

    after = await scrape()
    assert counts == [1, 0, 1]
    assert delta(before, after, "django_db_execute_many_total", **labels) == 3
    assert delta(before, after, "django_db_execute_total", **labels) >= 3


async def test_api_requests_count_in_the_request_series_by_view_and_status():
    client = AsyncClient()
    session = await open_session(client)
    before = await scrape(client)

    for _ in range(2):
        assert (await client.get("/transport/poll?timeout=0")).status_code == 401
    assert (await poll(client, session["token"])).status_code == 200

    after = await scrape(client)
    view = {"view": "transport.views.poll", "method": "GET"}
    by_status = "django_http_responses_total_by_status_view_method_total"
    assert delta(before, after, by_status, status="401", **view) == 2
    assert delta(before, after, by_status, status="200", **view) == 1
    by_view = "django_http_requests_total_by_view_transport_method_total"
    assert delta(before, after, by_view, transport="http", **view) == 3
    latency = "django_http_requests_latency_seconds_by_view_method_count"
    assert delta(before, after, latency, **view) == 3
