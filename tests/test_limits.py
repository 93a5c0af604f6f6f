"""Limits against abuse, in-process: rates per transport and network, connection
and concurrency caps, payload depth, origins, and who may read /metrics.

The real-process side (memory under a hello-less flood and a client that
never reads) is in test_limits_process.py.
"""

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient, Client

from config.asgi import application
from mailbox import api
from tests.helpers import fields, hello, recording, recv, send
from transport import clients, registry, signals
from transport.parking import parked_polls
from transport.registry import ActionContext, Payload

pytestmark = pytest.mark.django_db(transaction=True)


async def connect(address: str = "192.0.2.10", **scope: Any) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/ws/transport/", **scope)
    comm.scope["client"] = (address, 50000)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def closed_with(comm: WebsocketCommunicator) -> tuple[int, str]:
    output = await comm.receive_output(3)
    assert output["type"] == "websocket.close", output
    return output.get("code", 1000), output.get("reason", "")


async def pong(comm: WebsocketCommunicator) -> bool:
    """Ping; tell whether a pong came (False when the server closed instead)."""
    await send(comm, {"type": "ping"})
    output = await comm.receive_output(3)
    return output["type"] == "websocket.send" and json.loads(output["text"]) == {"type": "pong"}


class ClientAt(AsyncClient):
    """An AsyncClient whose requests come from an address, maybe through a proxy."""

    def __init__(self, address: str, forwarded_for: str | None = None) -> None:
        super().__init__()
        self.address = address
        self.forwarded_for = forwarded_for

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope: dict[str, Any] = super()._base_scope(**request)  # type: ignore[misc]
        scope["client"] = [self.address, 0]
        if self.forwarded_for is not None:
            scope["headers"].append((b"x-forwarded-for", self.forwarded_for.encode()))
        return scope


def rest_client(address: str, forwarded_for: str | None = None) -> AsyncClient:
    return ClientAt(address, forwarded_for)


# --- rate limits per transport and network --------------------------------------


async def test_a_websocket_is_limited_at_the_configured_rate_and_not_below(use_rate_limits):
    use_rate_limits("ws=10/m,rest=1/m")
    comm = await connect()  # the handshake counts as one
    await hello(comm)

    # Eight more frames make ten: all served.
    assert [await pong(comm) for _ in range(8)] == [True] * 8

    await send(comm, {"type": "ping"})
    code, reason = await closed_with(comm)
    assert code == 4429 and int(reason) >= 1


async def test_rest_is_limited_at_the_configured_rate_and_not_below(use_rate_limits):
    use_rate_limits("rest=5/m,ws=1/m")
    client = rest_client("192.0.2.10")

    statuses = [(await client.post("/transport/sessions")).status_code for _ in range(6)]

    assert statuses == [201] * 5 + [429]


async def test_each_transport_has_its_own_budget(use_rate_limits):
    use_rate_limits("ws=3/m,rest=3/m")
    client = rest_client("192.0.2.10")
    assert [(await client.post("/transport/sessions")).status_code for _ in range(3)] == [201] * 3

    # The REST budget is spent; the same network still has its WebSocket one.
    comm = await connect("192.0.2.10")
    await hello(comm)
    assert await pong(comm)
    await comm.disconnect()


async def test_addresses_of_one_ipv4_slash_24_share_a_budget(use_rate_limits):
    use_rate_limits("rest=2/m")
    await rest_client("192.0.2.10").post("/transport/sessions")
    await rest_client("192.0.2.200").post("/transport/sessions")

    same = await rest_client("192.0.2.77").post("/transport/sessions")
    other = await rest_client("192.0.3.77").post("/transport/sessions")

    assert (same.status_code, other.status_code) == (429, 201)


async def test_addresses_of_one_ipv6_slash_56_share_a_budget(use_rate_limits):
    use_rate_limits("rest=1/m")
    await rest_client("2001:db8:0:1::1").post("/transport/sessions")

    same = await rest_client("2001:db8:0:ff::2").post("/transport/sessions")
    other = await rest_client("2001:db8:0:100::1").post("/transport/sessions")

    assert (same.status_code, other.status_code) == (429, 201)


async def test_the_network_prefixes_are_settings(use_rate_limits, settings):
    settings.TRANSPORT_CLIENT_IPV4_PREFIX = 32
    use_rate_limits("rest=1/m")
    await rest_client("192.0.2.10").post("/transport/sessions")

    neighbour = await rest_client("192.0.2.11").post("/transport/sessions")
    again = await rest_client("192.0.2.10").post("/transport/sessions")

    assert (neighbour.status_code, again.status_code) == (201, 429)


def test_network_of_uses_the_configured_prefixes(settings):
    settings.TRANSPORT_CLIENT_IPV4_PREFIX = 16
    settings.TRANSPORT_CLIENT_IPV6_PREFIX = 48

    assert clients.network_of("192.0.2.10") == "192.0.0.0/16"
    assert clients.network_of("2001:db8:1:2::3") == "2001:db8:1::/48"
    assert clients.network_of("::ffff:192.0.2.10") == "192.0.0.0/16"
    assert clients.network_of("not an address") == clients.UNKNOWN


async def test_the_rate_limit_warning_names_the_real_prefix_and_the_metric_a_bucket(
    use_rate_limits, caplog
):
    use_rate_limits("rest=1/m")
    client = rest_client("198.51.100.23")
    await client.post("/transport/sessions")

    with caplog.at_level("WARNING", logger="transport.events"):
        await client.post("/transport/sessions")

    [line] = [r for r in caplog.records if r.getMessage() == "rate limited"]
    assert line.network == "198.51.100.0/24"
    assert "198.51.100.23" not in str(line.__dict__)
    assert len(line.ip_bucket) == 1  # one of 16 hex buckets


# --- the client's address behind proxies ------------------------------------------


@pytest.mark.parametrize(
    "peer, forwarded, expected",
    [
        # No proxy is trusted: the header is the client's own word.
        ("203.0.113.9", "198.51.100.7", "203.0.113.9"),
        # A trusted proxy: the address it appended is the client.
        ("10.0.0.5", "198.51.100.7", "198.51.100.7"),
        # Read from the right: what the client wrote itself comes first.
        ("10.0.0.5", "1.2.3.4, 198.51.100.7", "198.51.100.7"),
        # Two trusted hops are skipped.
        ("10.0.0.5", "198.51.100.7, 10.0.0.6", "198.51.100.7"),
        # Ports and brackets, as some proxies write them.
        ("10.0.0.5", "[2001:db8::7]:443", "2001:db8::7"),
        ("10.0.0.5", "198.51.100.7:5555", "198.51.100.7"),
        # Garbage where the client's address should be: unknown, one bucket.
        ("10.0.0.5", "bogus", None),
        # A trusted proxy that forwarded nothing.
        ("10.0.0.5", "", "10.0.0.5"),
    ],
)
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    settings, peer, forwarded, expected
):
    settings.TRANSPORT_TRUSTED_PROXIES = ["10.0.0.0/8"]

    assert clients.address(peer, forwarded) == expected


async def test_a_websocket_behind_a_trusted_proxy_is_limited_by_the_forwarded_network(
    use_rate_limits, settings
):
    settings.TRANSPORT_TRUSTED_PROXIES = ["10.0.0.5"]
    use_rate_limits("ws=1/m")
    header = [(b"x-forwarded-for", b"198.51.100.7")]

    with recording(signals.rate_limited) as (limited,):
        await connect("10.0.0.5", headers=header)
        second = await connect("10.0.0.5", headers=header)
        await closed_with(second)
        # Another client behind the same proxy has its own budget.
        other = await connect("10.0.0.5", headers=[(b"x-forwarded-for", b"203.0.113.1")])
        await other.receive_nothing(0.2)
        await other.disconnect()

    assert fields(limited, "network") == [{"network": "198.51.100.0/24"}]


async def test_rest_behind_a_trusted_proxy_is_limited_by_the_forwarded_network(
    use_rate_limits, settings
):
    settings.TRANSPORT_TRUSTED_PROXIES = ["10.0.0.5"]
    use_rate_limits("rest=1/m")

    first = rest_client("10.0.0.5", "198.51.100.7")
    neighbour = rest_client("10.0.0.5", "203.0.113.7")
    spoofed = rest_client("192.0.2.50", "198.51.100.7")

    with recording(signals.rate_limited) as (limited,):
        assert (await first.post("/transport/sessions")).status_code == 201
        # Another client behind the same proxy has its own budget.
        assert (await neighbour.post("/transport/sessions")).status_code == 201
        # An untrusted peer's header is ignored: its own network is counted.
        assert (await spoofed.post("/transport/sessions")).status_code == 201
        assert (await first.post("/transport/sessions")).status_code == 429

    assert fields(limited, "network") == [{"network": "198.51.100.0/24"}]


# --- WebSockets per network, actions per connection, polls per session -------------


async def test_websockets_per_network_are_capped_and_other_networks_served(settings):
    settings.TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK = 3
    held = [await connect("192.0.2.10") for _ in range(3)]

    refused = await connect("192.0.2.99")
    code, reason = await closed_with(refused)
    other = await connect("198.51.100.1")

    assert code == 4429 and int(reason) >= 1
    await hello(other)

    # A slot frees when a connection closes.
    await held.pop().disconnect()
    again = await connect("192.0.2.10")
    await hello(again)
    for comm in [*held, again, other]:
        await comm.disconnect()


async def test_an_idle_welcomed_websocket_runs_in_its_own_task_alone():
    # The first connection starts what the process shares (wake-ups, writers).
    first = await connect("192.0.2.1")
    await hello(first)
    assert await pong(first)
    before = len(asyncio.all_tasks())

    comms = [await connect(f"192.0.2.{i}") for i in range(2, 22)]
    for comm in comms:
        await hello(comm)
        assert await pong(comm)

    # Each communicator runs its consumer in one task; nothing else waits
    # on behalf of an idle connection, however many of them there are.
    assert len(asyncio.all_tasks()) - before == len(comms)
    for comm in [first, *comms]:
        await comm.disconnect()


@pytest.fixture
def slow_action() -> Iterator[asyncio.Event]:
    """Register `slow`, which waits until the returned event is set."""
    release = asyncio.Event()

    async def slow(ctx: ActionContext, payload: Payload) -> Payload:
        await release.wait()
        return {}

    registry.register("slow", slow)
    yield release
    release.set()
    registry._handlers.pop("slow", None)


async def test_actions_running_at_once_on_a_connection_are_capped(settings, slow_action):
    settings.TRANSPORT_WS_MAX_RUNNING_ACTIONS = 2
    comm = await connect()
    await hello(comm)

    for n in (1, 2, 3):
        await send(comm, {"type": "action", "id": n, "action": "slow"})

    refused = await recv(comm)
    assert (refused["id"], refused["error"]["code"]) == (3, "too_many_actions")
    slow_action.set()
    assert sorted([(await recv(comm))["id"] for _ in range(2)]) == [1, 2]
    await comm.disconnect()


async def test_an_action_past_its_timeout_keeps_its_slot_until_its_handler_returns(
    settings, slow_action
):
    settings.TRANSPORT_WS_MAX_RUNNING_ACTIONS = 1
    settings.TRANSPORT_ACTION_TIMEOUT = 0.2
    comm = await connect()
    await hello(comm)

    await send(comm, {"type": "action", "id": 1, "action": "slow"})
    assert (await recv(comm))["error"]["code"] == "timeout"
    await send(comm, {"type": "action", "id": 2, "action": "slow"})
    refused = await recv(comm)
    assert (refused["id"], refused["error"]["code"]) == (2, "too_many_actions")

    slow_action.set()
    late = await recv(comm)
    assert (late["message_type"], late["payload"]["id"]) == ("reply", 1)
    await send(comm, {"type": "action", "id": 3, "action": "slow"})
    assert (await recv(comm))["id"] == 3
    await comm.disconnect()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_second_poll_answers_the_first_at_once(settings):
    settings.TRANSPORT_POLL_TIMEOUT_MAX = 30
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    headers = bearer(session["token"])

    first = asyncio.ensure_future(client.get("/transport/poll?timeout=30", headers=headers))
    while len(parked_polls) == 0:
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(client.get("/transport/poll?timeout=30", headers=headers))

    answered = await asyncio.wait_for(first, 10)
    assert answered.status_code == 200
    assert answered.json()["messages"] == []
    assert not second.done()
    assert len(parked_polls) == 1

    # The second is the session's parked poll now: a delivery answers it.
    await sync_to_async(api.deliver)(session["session_id"], "note", {})
    assert [m["seq"] for m in (await asyncio.wait_for(second, 10)).json()["messages"]] == [1]


async def test_polls_of_different_sessions_do_not_answer_each_other(settings):
    settings.TRANSPORT_POLL_TIMEOUT_MAX = 30
    client = AsyncClient()
    alice = (await client.post("/transport/sessions")).json()
    bob = (await client.post("/transport/sessions")).json()

    first = asyncio.ensure_future(
        client.get("/transport/poll?timeout=30", headers=bearer(alice["token"]))
    )
    while len(parked_polls) == 0:
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(
        client.get("/transport/poll?timeout=0.5", headers=bearer(bob["token"]))
    )
    await asyncio.wait_for(second, 10)

    assert not first.done()
    first.cancel()


# --- payload depth and bracket floods -----------------------------------------------


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_a_payload_nested_deeper_than_the_limit_is_a_bad_request(settings):
    settings.TRANSPORT_MAX_PAYLOAD_DEPTH = 8
    comm = await connect()
    await hello(comm)

    await send(comm, {"type": "action", "id": 1, "action": "echo", "payload": nested(8)})
    await send(comm, {"type": "action", "id": 2, "action": "echo", "payload": nested(9)})

    answers = {frame.get("id", "error"): frame for frame in [await recv(comm), await recv(comm)]}
    assert answers[1]["ok"] is True
    assert answers["error"]["code"] == "bad_request"
    await comm.disconnect()


async def test_a_flood_of_brackets_within_the_size_limit_is_a_bad_request_on_both_transports():
    text = '{"type": "action", "id": 1, "action": "echo", "payload": {"a": '
    text += "[" * 20000 + "]" * 20000 + "}}"
    comm = await connect()
    await hello(comm)
    await send(comm, text)
    assert (await recv(comm))["code"] == "bad_request"
    await comm.disconnect()

    client = AsyncClient()
    token = (await client.post("/transport/sessions")).json()["token"]
    response = await client.post(
        "/transport/actions", data=text, content_type="application/json", headers=bearer(token)
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


# --- origins ----------------------------------------------------------------------------


async def handshake(origin: bytes | None) -> bool:
    headers = [(b"origin", origin)] if origin is not None else []
    comm = WebsocketCommunicator(application, "/ws/transport/", headers=headers)
    connected, _ = await comm.connect()
    await comm.disconnect()
    return bool(connected)


async def test_a_websocket_from_another_sites_page_is_refused():
    assert await handshake(b"https://evil.example") is False
    assert await handshake(b"null") is False


async def test_a_websocket_from_an_allowed_host_on_any_port_is_accepted():
    assert await handshake(b"http://127.0.0.1:8000") is True
    assert await handshake(b"http://localhost:43210") is True


async def test_a_websocket_without_origin_is_accepted_as_a_non_browser_client():
    assert await handshake(None) is True


async def test_allowed_origins_are_a_setting(settings):
    settings.TRANSPORT_WS_ALLOWED_ORIGINS = ["https://app.example", ".example.org"]

    assert await handshake(b"https://app.example") is True
    assert await handshake(b"http://app.example") is False
    assert await handshake(b"https://chat.example.org") is True
    assert await handshake(b"http://127.0.0.1:8000") is False


# --- /metrics ---------------------------------------------------------------------------


def scrape(address: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = Client(REMOTE_ADDR=address).get("/metrics", headers=headers)
    return int(response.status_code)


def test_metrics_answer_loopback_by_default():
    assert scrape("127.0.0.1") == 200
    assert scrape("::1") == 200


def test_metrics_refuse_other_networks_without_a_token():
    assert scrape("203.0.113.5") == 403


def test_metrics_answer_configured_networks(settings):
    settings.METRICS_ALLOWED_NETWORKS = ["10.1.0.0/16"]

    assert scrape("10.1.2.3") == 200
    assert scrape("127.0.0.1") == 403


def test_metrics_answer_the_bearer_token_from_anywhere(settings):
    settings.METRICS_BEARER_TOKEN = "s3cret-scrape-token"

    assert scrape("203.0.113.5", "s3cret-scrape-token") == 200
    assert scrape("203.0.113.5", "wrong") == 401
    assert scrape("203.0.113.5") == 401
