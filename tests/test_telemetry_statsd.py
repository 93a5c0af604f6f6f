"""StatsD lines reach a real UDP socket, well formed; an absent server costs nothing."""

import re
import socket
import time
from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from mailbox import api
from telemetry import statsd
from tests.helpers import Server, hello, migrated_sqlite, recv, send

pytestmark = pytest.mark.django_db(transaction=True)

LINE = re.compile(r"^app\.[A-Za-z0-9_\-.]+:-?\d+(\.\d+)?\|(c|g|ms)$")


@pytest.fixture
def udp(settings) -> Iterator[socket.socket]:
    """Yield a UDP socket on loopback that the process publishes to, as STATSD_HOST."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    settings.STATSD_HOST = "127.0.0.1"
    settings.STATSD_PORT = sock.getsockname()[1]
    settings.STATSD_PREFIX = "app"
    statsd.reset()
    yield sock
    statsd.reset()
    sock.close()


def received(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return lines
        lines.extend(data.decode("ascii").splitlines())


async def test_events_are_published_as_well_formed_statsd_lines(ws, udp):
    comm = await ws()
    await hello(comm)
    await send(comm, {"type": "action", "id": "a1", "action": "echo", "payload": {}})
    await recv(comm)
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    await client.get(
        "/transport/poll?timeout=0", headers={"Authorization": f"Bearer {session['token']}"}
    )

    lines = received(udp)

    assert lines and all(LINE.match(line) for line in lines), lines
    names = {line.split(":")[0] for line in lines}
    assert "app.session.opened.ws" in names
    assert "app.inbound_actions.ws.echo" in names
    assert "app.poll_duration.timeout" in names
    kinds = {line.rsplit("|", 1)[1] for line in lines}
    assert {"c", "ms"} <= kinds
    assert any(line.startswith("app.dispatch_latency.ws.echo:") for line in lines)


def test_a_gauge_is_published_as_g(udp):
    statsd.gauge("mailbox_capacity_sessions", 100000)

    assert received(udp) == ["app.mailbox_capacity_sessions:100000|g"]


def test_label_values_become_safe_name_segments(udp):
    statsd.incr(f"inbound_actions.ws.{statsd.part('cart.add:é|x')}")

    assert received(udp) == ["app.inbound_actions.ws.cart_add___x:1|c"]


def test_publishing_to_a_port_nobody_listens_on_costs_nothing(settings):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.STATSD_HOST, settings.STATSD_PORT = "127.0.0.1", port
    statsd.reset()
    try:
        started = time.perf_counter()
        for _ in range(1000):
            statsd.incr("mailbox_enqueue.system")
        # A thousand failed sends, not a thousand timeouts: generous bound.
        assert time.perf_counter() - started < 2.0
    finally:
        statsd.reset()


def test_an_unresolvable_host_turns_publishing_off(settings):
    settings.STATSD_HOST = "statsd.invalid"
    statsd.reset()
    try:
        statsd.incr("mailbox_enqueue.system")
        assert statsd.client() is None
    finally:
        statsd.reset()


async def test_database_gauges_count_sessions_per_transport_and_queued_messages(ws, udp):
    comm = await ws()
    await hello(comm)
    client = AsyncClient()
    polling = (await client.post("/transport/sessions")).json()
    await client.get(
        "/transport/poll?timeout=0", headers={"Authorization": f"Bearer {polling['token']}"}
    )
    offline = (await client.post("/transport/sessions")).json()
    for n in range(3):
        await api.adeliver(offline["session_id"], "note", {"n": n})
    received(udp)

    await database_sync_to_async(statsd.publish_database_gauges)()

    assert sorted(received(udp)) == [
        "app.mailbox_messages_queued._total:3|g",
        "app.session_active.mailbox:1|g",
        "app.session_active.rest:1|g",
        "app.session_active.ws:1|g",
    ]
    await comm.disconnect()


def test_a_server_publishes_the_database_gauges_every_interval(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        env = migrated_sqlite(tmp_path / "db.sqlite3")
        server = Server(
            {
                **env,
                "STATSD_HOST": "127.0.0.1",
                "STATSD_PORT": str(sock.getsockname()[1]),
                "STATSD_PREFIX": "app",
                "STATSD_GAUGE_INTERVAL": "0.2",
            }
        ).start()
        try:
            lines: list[str] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and lines.count("app.session_active.ws:0|g") < 2:
                lines += received(sock)
        finally:
            server.stop()

    # Two rounds at least: the thread keeps publishing, not only once.
    assert lines.count("app.session_active.ws:0|g") >= 2, lines
    assert "app.mailbox_messages_queued._total:0|g" in lines
