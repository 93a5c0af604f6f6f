"""The protocol over real `manage.py serve` (daphne) processes on loopback.

Each test runs on its own copy of a migrated SQLite file, starts the
servers it needs, and talks to them as any client would: `websockets` for the WebSocket, urllib
for REST. Deliveries come from separate `manage.py` processes, so the
cross-process wake-up of the embedded default is exercised for real.
"""

import asyncio
import contextlib
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.echo_rtt import echo_round_trips, open_ws
from tests.helpers import Server, manage, migrated_sqlite
from tests.wsclient import RECV_TIMEOUT, hello, recv, send

pytestmark = pytest.mark.process

# Generous bounds for a loaded 2-core machine; the contract promises one
# second for a cross-process wake-up on the embedded default.
WAKE_BOUND = 5.0

StartServer = Callable[..., Server]


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate one SQLite file for the module; each test gets its own copy."""
    path = tmp_path_factory.mktemp("template") / "db.sqlite3"
    migrated_sqlite(path)
    return path


@pytest.fixture
def db_env(migrated_template: Path, tmp_path: Path) -> dict[str, str]:
    """Return the env selecting this test's own copy of the migrated database."""
    path = tmp_path / "db.sqlite3"
    # migrate exits cleanly, so SQLite has folded its WAL into the main file.
    shutil.copyfile(migrated_template, path)
    return {"DATABASE_URL": f"sqlite:///{path}"}


@pytest.fixture
def start_server(db_env: dict[str, str], tmp_path: Path) -> Iterator[StartServer]:
    """Yield a function starting a server on the test's database; stop them all after."""
    started: list[Server] = []

    def start(**env: str) -> Server:
        log = tmp_path / f"server-{len(started)}.log"
        server = Server({**db_env, "SERVER_LOG": str(log), **env})
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.kill()


# --- clients ------------------------------------------------------------------

# urllib must not route loopback requests through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """Make one request; return status, headers and the decoded JSON body (or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener.open(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    return status, head, json.loads(raw) if raw else None


def create_session(server: Server) -> dict[str, Any]:
    status, _, body = http("POST", f"{server.url}/transport/sessions")
    assert status == 201, body
    return dict(body)


def deliver_many(env: dict[str, str], session_id: str, count: int) -> None:
    """Queue `count` messages from one separate process, as a cron job would."""
    code = (
        "from mailbox.api import deliver\n"
        f"for i in range(1, {count} + 1):\n"
        f"    deliver({session_id!r}, 'tick', {{'n': i}})\n"
    )
    result = manage("shell", "-c", code, env=env)
    assert result.returncode == 0, result.stderr


@pytest.fixture
async def ws_to() -> AsyncIterator[Callable[[Server], Any]]:
    """Yield a function opening a WebSocket to a server; close them all after."""
    opened: list[ClientConnection] = []

    async def connect(server: Server) -> ClientConnection:
        ws = await open_ws(server)
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        await ws.close()


async def until_pong(ws: ClientConnection) -> list[dict[str, Any]]:
    """Ping, and return every frame that came before the pong.

    Frames of one connection are handled in order, so the pong also proves
    that every earlier frame (an ack, say) has been processed.
    """
    await send(ws, {"type": "ping"})
    frames = []
    while (frame := await recv(ws))["type"] != "pong":
        frames.append(frame)
    return frames


def stamp(sent_at: str) -> float:
    """Return a message's `sent_at` (e.g. 2026-12-03T17:00:00.000Z) as a timestamp."""
    return datetime.strptime(sent_at, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


async def close_code(ws: ClientConnection) -> tuple[int, str]:
    """Wait for the server to close; return the code and reason of its close frame."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
    # rcvd is None when the server dropped TCP without a close frame.
    assert closed.value.rcvd is not None, "connection dropped without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


# --- tests --------------------------------------------------------------------


async def test_a_delivery_from_another_process_reaches_the_open_websocket(
    start_server, ws_to, db_env
):
    server = start_server()
    session = create_session(server)

    ws = await ws_to(server)
    welcome = await hello(ws, token=session["token"], after=0)
    assert welcome["session_id"] == session["session_id"]
    assert welcome["resumed"] is True
    assert welcome["gap"] is False
    await send(ws, {"type": "action", "id": "a1", "action": "echo", "payload": {"x": 1}})
    assert await recv(ws) == {"type": "reply", "id": "a1", "ok": True, "payload": {"x": 1}}

    # The shell process cannot reach the server's in-memory layer; the
    # server's database watcher has to notice the new seq. The wait is
    # measured from the message's sent_at, stamped as it was stored.
    async def receive() -> tuple[dict[str, Any], float]:
        frame = await recv(ws, timeout=120)
        return frame, time.time()

    receiving = asyncio.ensure_future(receive())
    result = await asyncio.to_thread(
        manage, "deliver", session["session_id"], "greeting", '{"text": "hi"}', env=db_env
    )
    assert result.returncode == 0, result.stderr
    message, received_at = await asyncio.wait_for(receiving, WAKE_BOUND)
    waited = received_at - stamp(message["sent_at"])
    print(f"cross-process wake-up reached the WebSocket in {waited * 1000:.0f} ms")
    assert waited < WAKE_BOUND

    assert message["type"] == "message"
    assert message["seq"] == 1
    assert message["message_type"] == "greeting"
    assert message["payload"] == {"text": "hi"}

    await send(ws, {"type": "ack", "seq": 1})
    assert await until_pong(ws) == []
    status, _, body = http("GET", f"{server.url}/transport/mailbox", token=session["token"])
    assert status == 200
    assert body["messages"] == []


async def test_a_parked_long_poll_is_woken_by_a_delivery_from_another_process(
    start_server, db_env
):
    server = start_server()
    session = create_session(server)
    url = f"{server.url}/transport/poll?after=0&timeout=20"

    answered = threading.Event()

    def poll() -> tuple[int, Any, float]:
        try:
            status, _, body = http("GET", url, token=session["token"])
            return status, body, time.time()
        finally:
            answered.set()

    polling = asyncio.ensure_future(asyncio.to_thread(poll))
    await asyncio.sleep(0.5)
    assert not answered.is_set(), "the poll answered before anything was queued"

    result = await asyncio.to_thread(
        manage, "deliver", session["session_id"], "greeting", '{"text": "hi"}', env=db_env
    )
    assert result.returncode == 0, result.stderr
    status, body, answered_at = await asyncio.wait_for(polling, 25)

    assert status == 200
    assert [(m["seq"], m["message_type"], m["payload"]) for m in body["messages"]] == [
        (1, "greeting", {"text": "hi"})
    ]
    assert body["next_after"] == 1
    assert body["gap"] is False
    waited = answered_at - stamp(body["messages"][0]["sent_at"])
    print(f"cross-process wake-up answered the long-poll in {waited * 1000:.0f} ms")
    assert waited < WAKE_BOUND


async def test_daphne_closes_an_oversized_frame_with_1009(start_server, ws_to):
    server = start_server(TRANSPORT_MAX_FRAME_BYTES="4096")
    ws = await ws_to(server)
    await hello(ws)

    await send(ws, {"type": "ping", "pad": "x" * 8000})

    code, _ = await close_code(ws)
    assert code == 1009


async def test_a_frame_just_under_the_limit_is_answered(start_server, ws_to):
    server = start_server(TRANSPORT_MAX_FRAME_BYTES="4096")
    ws = await ws_to(server)
    await hello(ws)

    padding = "x" * (4096 - 200)
    await send(ws, {"type": "action", "id": "big", "action": "echo", "payload": {"p": padding}})

    reply = await recv(ws)
    assert reply["ok"] is True
    assert reply["payload"] == {"p": padding}


async def test_the_server_closes_with_4408_when_no_hello_comes(start_server, ws_to):
    server = start_server(TRANSPORT_HELLO_TIMEOUT="0.5")
    ws = await ws_to(server)

    code, _ = await close_code(ws)
    assert code == 4408


async def test_unacknowledged_messages_survive_a_killed_server_exactly_once(
    start_server, ws_to, db_env
):
    first = start_server()
    session = create_session(first)
    await asyncio.to_thread(deliver_many, db_env, session["session_id"], 20)

    # Read eight, acknowledge three, then kill the server without warning.
    ws = await ws_to(first)
    await hello(ws, token=session["token"], after=0)
    seen = [(await recv(ws))["seq"] for _ in range(8)]
    assert seen == list(range(1, 9))
    await send(ws, {"type": "ack", "seq": 3})
    await until_pong(ws)
    first.kill()

    second = start_server()
    ws = await ws_to(second)
    welcome = await hello(ws, token=session["token"], after=3)
    assert welcome["resumed"] is True
    assert welcome["gap"] is False
    assert welcome["next_seq"] == 21

    messages = [await recv(ws) for _ in range(17)]
    assert [m["seq"] for m in messages] == list(range(4, 21))
    assert [m["payload"] for m in messages] == [{"n": n} for n in range(4, 21)]
    assert await until_pong(ws) == [], "a message came twice"

    # Once everything is acknowledged, a new connection gets nothing again.
    await send(ws, {"type": "ack", "seq": 20})
    await until_pong(ws)
    await ws.close()
    ws = await ws_to(second)
    welcome = await hello(ws, token=session["token"])
    assert welcome["next_seq"] == 21
    assert await until_pong(ws) == []


def test_health_and_readiness_answer_200(start_server):
    server = start_server()

    status, _, body = http("GET", f"{server.url}/healthz")
    assert status == 200
    assert body == {"status": "ok"}

    status, _, body = http("GET", f"{server.url}/readyz")
    assert status == 200
    assert body["ready"] is True
    assert body["checks"] == {"database": "ok", "channel_layer": "ok"}


async def test_a_burst_of_frames_is_closed_with_4429_and_a_retry_delay(start_server, ws_to):
    server = start_server(TRANSPORT_RATE_LIMITS="ws=5/s,rest=3/s")
    ws = await ws_to(server)
    await hello(ws)

    # The handshake and hello took two of the five; the burst overruns the rest.
    with contextlib.suppress(ConnectionClosed):
        for _ in range(20):
            await send(ws, {"type": "ping"})
    code, reason = await close_code(ws)
    assert code == 4429
    assert reason.isdigit() and int(reason) >= 1, reason


def test_a_burst_of_requests_is_answered_429_with_retry_after(start_server):
    server = start_server(TRANSPORT_RATE_LIMITS="ws=5/s,rest=3/s")

    # Sent at once, so that all of them fall in one window however slow the
    # machine; without a token the three let through answer 401.
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(
            pool.map(lambda _: http("GET", f"{server.url}/transport/mailbox"), range(10))
        )

    # Three pass the limit; more only if the machine spread the burst past 1 s.
    statuses = sorted(status for status, _, _ in answers)
    assert statuses[:3] == [401] * 3
    assert set(statuses) == {401, 429}
    for status, headers, body in answers:
        if status == 429:
            assert body["error"]["code"] == "rate_limited"
            assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) >= 1


async def test_sequential_echo_round_trips_over_daphne(start_server, ws_to):
    server = start_server()
    ws = await ws_to(server)
    await hello(ws)

    count = 300
    rate = await echo_round_trips(ws, count)

    print(f"echo over one WebSocket on daphne: {count} round trips, {rate:.0f} per second")
    assert await until_pong(ws) == []


def test_the_api_skips_the_sites_middleware_but_keeps_its_request_metrics(start_server):
    # The admin's chain adds X-Frame-Options; the API's short chain does not.
    server = start_server()
    status, api_headers, _ = http("POST", f"{server.url}/transport/sessions")
    with _opener.open(f"{server.url}/admin/login/", timeout=30) as response:
        site_headers = dict(response.headers)
    with _opener.open(f"{server.url}/metrics", timeout=30) as response:
        metrics = response.read().decode()

    assert status == 201
    assert "X-Frame-Options" not in api_headers
    assert "X-Frame-Options" in site_headers
    counted = 'view="transport.views.create_session"} 1.0'
    assert any(line.endswith(counted) for line in metrics.splitlines())
