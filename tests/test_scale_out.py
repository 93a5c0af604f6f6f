"""The scaled-out form on real Redis and PostgreSQL: several servers, a worker.

Every test runs real processes on loopback: `manage.py serve` (daphne)
servers and `manage.py runworker transport-worker` workers, on a copy of a
migrated PostgreSQL database and a Redis of their own or a flushed shared
one. The servers and workers load tests/testapp, whose actions deliver to
another session or stall a worker so that it can be killed mid-action.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import ROOT, Server, manage
from tests.services import TEST_APPS, PostgresCluster, RedisServer, Worker
from tests.wsclient import hello, recv, send

pytestmark = pytest.mark.process

# Bounds for a loaded 2-core machine: far above what a healthy run needs,
# far below the long-poll timeouts they are compared with.
WAKE_BOUND = 10.0


# --- services ---------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """Yield one PostgreSQL cluster for the whole run, with a migrated template."""
    cluster = PostgresCluster().start()
    try:
        cluster.migrated_template()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def database(postgres: PostgresCluster) -> str:
    """Return the URL of a fresh database of this test, copied from the template."""
    return postgres.create_database("t_" + uuid.uuid4().hex[:12], "transport_template")


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(shared_redis: RedisServer) -> RedisServer:
    """Return the shared Redis, emptied: no job or bucket of an earlier test is left."""
    shared_redis.flush()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Yield a Redis of this test alone, for tests that restart it."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


class Stack:
    """Servers and workers of one test, sharing a database and a Redis."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = env
        self.tmp_path = tmp_path
        self.servers: list[Server] = []
        self.workers: list[Worker] = []

    def server(self, **env: str) -> Server:
        log = self.tmp_path / f"server-{len(self.servers)}.log"
        server = Server({**self.env, **TEST_APPS, "SERVER_LOG": str(log), **env})
        self.servers.append(server)
        return server.start()

    def worker(self, **env: str) -> Worker:
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = Worker({**self.env, **env}, log)
        self.workers.append(worker)
        return worker.start()

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        for worker in self.workers:
            worker.kill()


@pytest.fixture
def stack(database: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    """Yield a Stack on this test's database and the shared Redis; kill it after."""
    running = Stack({"DATABASE_URL": database, "REDIS_URL": redis_server.url}, tmp_path)
    try:
        yield running
    finally:
        running.close()


# --- clients ----------------------------------------------------------------

# urllib must not route loopback requests through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 40
) -> tuple[int, dict[str, str], Any]:
    """Make one request; return status, headers and the decoded JSON body (or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener.open(request, timeout=timeout) as response:
            raw = response.read()
            status, response_headers = response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status, response_headers = exc.code, dict(exc.headers)
    return status, response_headers, json.loads(raw) if raw else None


def new_session(server: Server) -> dict[str, Any]:
    status, _, body = http("POST", f"{server.url}/transport/sessions")
    assert status == 201, body
    return dict(body)


def poll(server: Server, token: str, after: int, timeout: float) -> dict[str, Any]:
    url = f"{server.url}/transport/poll?after={after}&timeout={timeout}"
    status, _, body = http("GET", url, token=token, timeout=timeout + 30)
    assert status == 200, body
    return dict(body)


def act(server: Server, token: str, action_id: str, action: str, **payload: Any) -> Any:
    """POST an action; return (status, body)."""
    body = {"id": action_id, "action": action, "payload": payload}
    status, _, answer = http("POST", f"{server.url}/transport/actions", body, token)
    return status, answer


def group_size(redis_server: RedisServer, session_id: str) -> int:
    """Count the processes listening for a session's wake-ups (channels-redis's key)."""
    return int(redis_server.client().zcard(f"asgi:group:mbx.{session_id}"))


def wait_for(condition: Any, what: str, bound: float = WAKE_BOUND) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- two servers and a worker -------------------------------------------------


async def test_an_action_on_server_a_runs_on_the_worker_and_reaches_a_client_on_b(
    stack: Stack,
) -> None:
    worker = stack.worker()
    server_a, server_b = stack.server(), stack.server()

    async with connect(server_b.ws_url) as ws_b, connect(server_a.ws_url) as ws_a:
        welcome_b = await hello(ws_b)
        await hello(ws_a)

        await send(
            ws_a,
            {
                "type": "action",
                "id": "a-1",
                "action": "test.deliver",
                "payload": {
                    "to": welcome_b["session_id"],
                    "message_type": "note",
                    "payload": {"text": "from a"},
                },
            },
        )
        reply = await recv(ws_a)
        assert reply["ok"] is True, reply
        # The handler ran in the worker process, not in either server.
        assert reply["payload"] == {"seq": 1, "pid": worker.pid}

        message = await recv(ws_b)
        assert message["type"] == "message"
        assert (message["seq"], message["message_type"]) == (1, "note")
        assert message["payload"] == {"text": "from a"}
        await send(ws_b, {"type": "ack", "seq": 1})

        # Once: no second copy comes through another server's wake-up.
        await send(ws_b, {"type": "ping"})
        assert await recv(ws_b) == {"type": "pong"}
        with pytest.raises(TimeoutError):
            await recv(ws_b, timeout=1.5)


def test_a_long_poll_parked_on_server_a_is_woken_by_an_action_on_server_b(
    stack: Stack, redis_server: RedisServer
) -> None:
    stack.worker()
    server_a, server_b = stack.server(), stack.server()
    session = new_session(server_a)
    answers: list[dict[str, Any]] = []

    parked = threading.Thread(
        target=lambda: answers.append(poll(server_a, session["token"], after=0, timeout=40))
    )
    parked.start()
    # Server A listens for the session's wake-ups once its poll is parked.
    wait_for(lambda: group_size(redis_server, session["session_id"]) == 1, "the parked poll")

    sent = time.monotonic()
    status, reply = act(
        server_b,
        session["token"],
        "b-1",
        "test.deliver",
        to=session["session_id"],
        message_type="note",
        payload={"n": 1},
    )
    assert status == 200 and reply["ok"], reply
    parked.join(timeout=60)

    assert time.monotonic() - sent < WAKE_BOUND, "the poll timed out instead of waking"
    [answer] = answers
    assert [(m["seq"], m["payload"]) for m in answer["messages"]] == [(1, {"n": 1})]


def test_alternating_polls_between_two_servers_lose_and_repeat_nothing(stack: Stack) -> None:
    stack.worker()
    servers = [stack.server(), stack.server()]
    session = new_session(servers[0])
    total = 30

    def produce() -> None:
        # Deliveries come through both servers (and the worker) while the
        # consumer's polls hop between them.
        for n in range(total):
            status, reply = act(
                servers[n % 2],
                session["token"],
                f"p-{n}",
                "test.deliver",
                to=session["session_id"],
                message_type="note",
                payload={"n": n},
            )
            assert status == 200 and reply["ok"], reply

    producer = threading.Thread(target=produce)
    producer.start()
    received: list[dict[str, Any]] = []
    after, hops = 0, 0
    deadline = time.monotonic() + 90
    while len(received) < total and time.monotonic() < deadline:
        answer = poll(servers[hops % 2], session["token"], after=after, timeout=10)
        received += answer["messages"]
        after = answer["next_after"]
        hops += 1
    producer.join(timeout=60)

    assert [m["payload"]["n"] for m in received] == list(range(total))
    assert [m["seq"] for m in received] == list(range(1, total + 1))
    # One more poll on the other server: nothing comes twice.
    assert poll(servers[hops % 2], session["token"], after=after, timeout=0)["messages"] == []


# --- PostgreSQL under concurrent writers --------------------------------------


@pytest.mark.timeout(400)
def test_twenty_concurrent_writers_get_ten_thousand_contiguous_unique_seqs(
    postgres: PostgresCluster, database: str
) -> None:
    env = {"DATABASE_URL": database, **TEST_APPS, "TRANSPORT_MAILBOX_CAPACITY": "20000"}
    created = manage(
        "shell", "-c", "from mailbox import store; print(store.create_session().session_id)",
        env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    session_id = created.stdout.strip().splitlines()[-1]

    # 4 processes of 5 threads: 20 writers, each on its own connection.
    writers = [
        subprocess.Popen(
            [sys.executable, "manage.py", "deliver_burst", session_id, "500"]
            + ["--writers", "5", "--tag", f"p{p}-"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-3000:]

    name = database.rsplit("/", 1)[1]
    with postgres.connect(name) as conn:
        rows = conn.execute(
            "SELECT seq, payload FROM mailbox_message WHERE mailbox_id = %s ORDER BY seq",
            (session_id,),
        ).fetchall()
        last_seq, queued = conn.execute(
            "SELECT last_seq, queued FROM mailbox_mailbox WHERE session_id = %s", (session_id,)
        ).fetchone() or (None, None)

    assert [seq for seq, _ in rows] == list(range(1, 10_001))
    assert (last_seq, queued) == (10_000, 10_000)
    # Each writer's own messages keep the order it sent them in.
    by_writer: dict[str, list[int]] = {}
    for _, payload in rows:
        by_writer.setdefault(payload["w"], []).append(payload["n"])  # type: ignore[index]
    assert len(by_writer) == 20
    assert all(ns == list(range(500)) for ns in by_writer.values())


# --- faults -------------------------------------------------------------------


class WsReader:
    """A WebSocket client that acks what it gets and reconnects when closed."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.payloads: list[Any] = []
        self.seqs: list[int] = []
        self.reconnects = 0
        self.token: str | None = None
        self.session_id: str | None = None

    async def run(self, until: Any) -> None:
        """Read, ack and reconnect with `after` until `until()` holds."""
        while not until():
            try:
                async with connect(self.server.ws_url, open_timeout=10) as ws:
                    fields = {"token": self.token, "after": max(self.seqs, default=0)}
                    welcome = await hello(ws, **(fields if self.token else {}))
                    self.token, self.session_id = welcome["token"], welcome["session_id"]
                    while not until():
                        try:
                            frame = await recv(ws, timeout=0.5)
                        except TimeoutError:
                            continue
                        if frame["type"] == "message":
                            self.seqs.append(frame["seq"])
                            self.payloads.append(frame["payload"])
                            await send(ws, {"type": "ack", "seq": frame["seq"]})
            except (ConnectionClosed, OSError, TimeoutError):
                self.reconnects += 1
                await asyncio.sleep(0.2)


def burst(env: dict[str, str], session_id: str, count: int, tag: str) -> subprocess.Popen[str]:
    """Start a shell process delivering `count` messages, one every 50 ms."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "deliver_burst", session_id, str(count)]
        + ["--tag", tag, "--interval", "0.05"],
        cwd=ROOT,
        env={**os.environ, **TEST_APPS, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_no_durable_message_is_lost_when_redis_restarts_during_traffic(
    stack: Stack, own_redis: RedisServer
) -> None:
    stack.env["REDIS_URL"] = own_redis.url
    stack.worker()
    # A short sweep, so that lost wake-up groups come back within the test.
    server_a, server_b = (stack.server(TRANSPORT_WAKEUP_SWEEP="1") for _ in range(2))
    count = 60

    # A WebSocket client on B, and a long-poll client on A.
    reader = WsReader(server_b)
    reading = asyncio.ensure_future(reader.run(lambda: len(reader.seqs) >= count + 1))
    await asyncio.to_thread(wait_for, lambda: reader.session_id is not None, "the welcome")
    assert reader.session_id is not None
    poller = new_session(server_a)
    polled: list[dict[str, Any]] = []

    def poll_all() -> None:
        after, deadline = 0, time.monotonic() + 90
        while len(polled) < count + 1 and time.monotonic() < deadline:
            answer = poll(server_a, poller["token"], after=after, timeout=5)
            polled.extend(answer["messages"])
            after = answer["next_after"]

    polling = threading.Thread(target=poll_all)
    polling.start()

    # Deliveries from shell processes go on while Redis goes away and comes
    # back empty: they are stored, their wake-ups are lost.
    env = {"DATABASE_URL": stack.env["DATABASE_URL"], "REDIS_URL": own_redis.url}
    shells = [
        burst(env, reader.session_id, count, "ws"),
        burst(env, poller["session_id"], count, "rest"),
    ]
    await asyncio.sleep(1)
    own_redis.stop()
    await asyncio.sleep(1)
    own_redis.start()
    for shell in shells:
        _, err = await asyncio.to_thread(shell.communicate, timeout=120)
        assert shell.returncode == 0, err[-3000:]

    # After the restart, an action through A and the worker reaches both
    # clients again: the servers listen for their sessions anew.
    for session_id, n in ((reader.session_id, count), (poller["session_id"], count)):
        status, reply = await asyncio.to_thread(
            act, server_a, poller["token"], f"after-{session_id}", "test.deliver",
            to=session_id, message_type="burst", payload={"w": "after", "n": n},
        )  # fmt: skip
        assert status == 200 and reply["ok"], reply

    done, _ = await asyncio.wait([reading], timeout=60)
    reading.cancel()
    await asyncio.to_thread(polling.join, 60)
    assert done, f"the WebSocket client got only {reader.seqs}"
    assert reader.seqs == list(range(1, count + 2))
    assert [m["seq"] for m in polled] == list(range(1, count + 2))
    assert [p["n"] for p in reader.payloads] == list(range(count + 1))
    # The WebSocket itself never needed Redis: it outlived the outage.
    assert reader.reconnects == 0


def test_a_worker_killed_mid_action_answers_202_then_an_error_and_a_retry_runs_again(
    stack: Stack,
) -> None:
    timeout = {"TRANSPORT_ACTION_TIMEOUT": "1"}
    hanging = stack.worker(TEST_ACTION_DELAY="600", **timeout)
    server = stack.server(**timeout)
    session = new_session(server)

    # The worker starts the action and hangs: the client gets 202, not silence.
    status, body = act(server, session["token"], "job-1", "test.work")
    assert (status, body) == (202, {"id": "job-1", "status": "pending"})
    started = poll(server, session["token"], after=0, timeout=20)["messages"]
    assert [(m["message_type"], m["payload"]) for m in started] == [
        ("test.started", {"pid": hanging.pid})
    ]

    hanging.kill(signal.SIGKILL)
    # The reply that will never come is answered as an error in the mailbox.
    late = poll(server, session["token"], after=1, timeout=20)["messages"]
    assert [m["message_type"] for m in late] == ["reply"]
    assert late[0]["payload"]["id"] == "job-1"
    assert late[0]["payload"]["ok"] is False
    assert late[0]["payload"]["error"]["code"] == "worker_error"

    # Retries of the same id wait for the dead attempt, then run it again
    # once the claim counts as abandoned; every answer is 202 or the reply.
    fresh = stack.worker(**timeout)
    deadline = time.monotonic() + 60
    answers = []
    while time.monotonic() < deadline:
        status, body = act(server, session["token"], "job-1", "test.work")
        answers.append(status)
        if status == 200:
            break
        assert (status, body) == (202, {"id": "job-1", "status": "pending"})
        time.sleep(0.5)
    assert status == 200, answers
    assert body == {"type": "reply", "id": "job-1", "ok": True, "payload": {"pid": fresh.pid}}

    # A further retry gets the stored reply; the handler does not run again.
    assert act(server, session["token"], "job-1", "test.work") == (200, body)
    after = late[0]["seq"]
    rest = poll(server, session["token"], after=after, timeout=1)["messages"]
    assert [(m["message_type"], m["payload"]) for m in rest] == [
        ("test.started", {"pid": fresh.pid})
    ]


async def test_a_websocket_action_without_a_live_worker_answers_a_timeout_error(
    stack: Stack,
) -> None:
    server = stack.server(TRANSPORT_ACTION_TIMEOUT="1")

    async with connect(server.ws_url) as ws:
        await hello(ws)
        await send(ws, {"type": "action", "id": 7, "action": "echo", "payload": {}})
        reply = await recv(ws)

    assert reply["id"] == 7 and reply["ok"] is False
    assert reply["error"]["code"] == "timeout"


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """Yield a PostgreSQL cluster of this test alone, for tests that stop it."""
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


async def test_a_stopped_database_answers_503_and_service_resumes_when_it_returns(
    stack: Stack, own_postgres: PostgresCluster
) -> None:
    template = own_postgres.migrated_template()
    stack.env["DATABASE_URL"] = own_postgres.create_database("live", template)
    server = stack.server()
    session = await asyncio.to_thread(new_session, server)
    status, _, body = await asyncio.to_thread(http, "GET", f"{server.url}/readyz")
    assert status == 200, body

    own_postgres.stop()
    try:
        status, _, body = await asyncio.to_thread(http, "GET", f"{server.url}/readyz")
        assert status == 503 and body["checks"]["database"].startswith("failed"), body
        status, _, body = await asyncio.to_thread(http, "POST", f"{server.url}/transport/sessions")
        assert (status, body["error"]["code"]) == (503, "unavailable")
        url = f"{server.url}/transport/poll?after=0&timeout=1"
        status, _, body = await asyncio.to_thread(http, "GET", url, None, session["token"])
        assert (status, body["error"]["code"]) == (503, "unavailable")
        async with connect(server.ws_url) as ws:
            await send(ws, {"type": "hello"})
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    finally:
        own_postgres.start()

    # The same session works again once the database is back.
    status, _, body = await asyncio.to_thread(http, "GET", f"{server.url}/readyz")
    assert status == 200, body
    answer = await asyncio.to_thread(poll, server, session["token"], 0, 0)
    assert answer["messages"] == [] and answer["gap"] is False
    async with connect(server.ws_url) as ws:
        welcome = await hello(ws, token=session["token"], after=0)
    assert welcome["session_id"] == session["session_id"]


def test_rate_limits_count_one_client_network_across_both_servers(stack: Stack) -> None:
    limits = {"TRANSPORT_RATE_LIMITS": "rest=6/m"}
    servers = [stack.server(**limits), stack.server(**limits)]

    statuses = [http("POST", f"{servers[n % 2].url}/transport/sessions")[0] for n in range(6)]
    assert statuses == [201] * 6

    for server in servers:
        status, headers, body = http("POST", f"{server.url}/transport/sessions")
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1


async def test_an_action_while_redis_is_down_answers_503_and_its_retry_runs_later(
    stack: Stack, own_redis: RedisServer
) -> None:
    stack.env["REDIS_URL"] = own_redis.url
    stack.worker()
    server = stack.server()
    session = await asyncio.to_thread(new_session, server)

    async with connect(server.ws_url) as ws:
        await hello(ws, token=session["token"], after=0)
        own_redis.stop()
        try:
            status, body = await asyncio.to_thread(act, server, session["token"], "r-1", "echo")
            assert (status, body["error"]["code"]) == (503, "unavailable"), body
            status, _, body = await asyncio.to_thread(http, "GET", f"{server.url}/readyz")
            assert status == 503 and body["checks"]["channel_layer"].startswith("failed")
            # The WebSocket answers the same error as a reply, and stays open.
            await send(ws, {"type": "action", "id": "r-2", "action": "echo", "payload": {}})
            reply = await recv(ws)
            assert (reply["id"], reply["ok"]) == ("r-2", False)
            assert reply["error"]["code"] == "unavailable"
        finally:
            own_redis.start()

        # The refused job never ran: retrying its id runs it now.
        status, body = await asyncio.to_thread(act, server, session["token"], "r-1", "echo", n=1)
        assert (status, body["ok"], body["payload"]) == (200, True, {"n": 1})
        await send(ws, {"type": "action", "id": "r-2", "action": "echo", "payload": {"n": 2}})
        reply = await recv(ws)
        assert (reply["ok"], reply["payload"]) == (True, {"n": 2})
