"""The browser client (transport/static/transport/client.js) in real headless Chromium.

Each test opens a page on a real daphne process, starts a TransportClient
in it and records what it hands to the page; messages are delivered from
other processes, as any Django code would.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    Server,
    free_port,
    migrated_sqlite,
)

pytestmark = pytest.mark.process


# Generous: a 2-core machine running the whole suite starts Django slowly.
WAIT_MS = 20_000

# Any document the server itself serves puts the page on its origin, as on
# a real site; /healthz is the smallest. (A page faked by the browser's
# request interception would count as public, and Chromium then refuses
# its WebSockets to loopback.)
BLANK_PAGE = "/healthz"

START_CLIENT = """async (options) => {
  const { TransportClient } = await import("/static/transport/client.js");
  window.received = [];
  window.transports = [];
  window.states = [];
  window.gaps = 0;
  window.wsUrl = options.wsUrl || null;
  delete options.wsUrl;
  if (options.storage === "local") options.storage = localStorage;
  const client = new TransportClient({ ...options, wsUrl: () => window.wsUrl });
  client.on("message", (m) => received.push(m));
  client.on("transport", (t) => transports.push(t.transport));
  client.on("state", (s) => states.push(s.state));
  client.on("gap", () => { gaps += 1; });
  window.client = client;
  client.start();
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Launch Debian's Chromium, headless, once for the module."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# A Django process that delivers `note` messages when asked on stdin: one
# start-up for many deliveries, made outside the server as cron's would be.
DELIVERER = """
import json, sys, time
from mailbox.api import deliver
for line in sys.stdin:
    job = json.loads(line)
    for n in job["numbers"]:
        deliver(job["to"], "note", {"n": n})
        time.sleep(job["pause"])
    print("delivered", flush=True)
"""


class Deliverer:
    """Deliver `note` {n} messages to a session from a separate Django process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "-c", DELIVERER],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, session_id: str, numbers: range, pause: float = 0) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        job = {"to": session_id, "numbers": list(numbers), "pause": pause}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line == "delivered\n":
                return
        raise AssertionError(f"the deliverer exited with {self.proc.wait()}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fresh_db(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], dict[str, str]]:
    """Return a function giving the env of a new migrated SQLite database."""
    template = tmp_path_factory.mktemp("template") / "db.sqlite3"
    migrated_sqlite(template)

    def copy() -> dict[str, str]:
        path = tmp_path_factory.mktemp("browser") / "db.sqlite3"
        shutil.copy(template, path)
        return {"DATABASE_URL": f"sqlite:///{path}"}

    return copy


@pytest.fixture(scope="module")
def server(fresh_db: Callable[[], dict[str, str]]) -> Iterator[Server]:
    """A daphne process with its own migrated SQLite database."""
    started = Server(fresh_db()).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def strict_server(fresh_db: Callable[[], dict[str, str]]) -> Iterator[Server]:
    """A server with rate limits on, and actions that outlive a short timeout.

    `test.work` (tests.testapp) takes 1.5 s; the action timeout is 0.5 s.
    """
    env = {
        **fresh_db(),
        "TRANSPORT_RATE_LIMITS": "ws=20/s,rest=20/s",
        "TRANSPORT_ACTION_TIMEOUT": "0.5",
        "TRANSPORT_EXTRA_APPS": "tests.testapp",
        "TEST_ACTION_DELAY": "1.5",
    }
    started = Server(env).start()
    yield started
    started.stop()


@pytest.fixture
def deliverers() -> Iterator[Callable[[dict[str, str]], Deliverer]]:
    """Return a function starting a Deliverer on a database; all stop afterwards."""
    started: list[Deliverer] = []

    def start(env: dict[str, str]) -> Deliverer:
        started.append(Deliverer(env))
        return started[-1]

    yield start
    for deliverer in started:
        deliverer.close()


@pytest.fixture
def deliver(server: Server, deliverers: Callable[[dict[str, str]], Deliverer]) -> Deliverer:
    """A Deliverer on the module server's database."""
    return deliverers(server.env)


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """Return a function opening a fresh tab (own sessionStorage) on a server's origin."""
    contexts: list[Any] = []

    def open_(server: Server, path: str = BLANK_PAGE) -> Any:
        context = browser.new_context(viewport={"width": 900, "height": 820})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(path if path.startswith("http") else server.url + path)
        return page

    yield open_
    for context in contexts:
        context.close()


def start_client(page: Any, **options: Any) -> None:
    page.evaluate(START_CLIENT, options)


def wait_open(page: Any, transport: str) -> str:
    """Wait until the client is open on `transport`; return its session id."""
    page.wait_for_function("t => client.state === 'open' && client.transport === t", arg=transport)
    session_id: str = page.evaluate("client.sessionId")
    return session_id


def wait_received(page: Any, count: int) -> list[dict[str, Any]]:
    page.wait_for_function("n => received.length >= n", arg=count)
    received: list[dict[str, Any]] = page.evaluate("received")
    return received


def queued(server: Server, token: str) -> list[int]:
    """Return the seqs still unacknowledged in a session's mailbox."""
    request = urllib.request.Request(
        f"{server.url}/transport/mailbox?after=0",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [m["seq"] for m in json.loads(response.read())["messages"]]


def numbers(received: list[dict[str, Any]]) -> list[int]:
    return [m["payload"]["n"] for m in received if m["message_type"] == "note"]


def test_the_page_gets_messages_and_action_replies_over_the_websocket(
    server: Server, open_page: Any, deliver: Deliverer
) -> None:
    page = open_page(server)
    start_client(page)
    session_id = wait_open(page, "ws")

    deliver(session_id, range(1, 4))
    received = wait_received(page, 3)
    assert [m["seq"] for m in received] == [1, 2, 3]
    assert numbers(received) == [1, 2, 3]
    assert all(m["sent_at"].endswith("Z") for m in received)

    assert page.evaluate("client.action('echo', {hi: 'there'})") == {"hi": "there"}
    code = page.evaluate("client.action('no.such').then(() => 'resolved', (e) => e.code)")
    assert code == "unknown_action"

    # What the page was handed is acknowledged: nothing stays queued.
    token = page.evaluate("client.token")
    deadline = time.monotonic() + 10
    while queued(server, token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queued(server, token) == []
    assert page.evaluate("transports") == ["ws"]


def test_the_page_long_polls_when_the_websocket_hangs(
    server: Server, open_page: Any, deliver: Deliverer
) -> None:
    # A listener that never answers the handshake: the WebSocket cannot open.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        page = open_page(server)
        start_client(
            page,
            wsUrl=f"ws://127.0.0.1:{hole.getsockname()[1]}/ws/transport/",
            connectTimeout=1000,
            wsRetryDelay=60_000,
        )
        session_id = wait_open(page, "poll")

        deliver(session_id, range(1, 4))
        received = wait_received(page, 3)
        assert [m["seq"] for m in received] == [1, 2, 3]
        assert numbers(received) == [1, 2, 3]
        assert page.evaluate("client.action('echo', {over: 'rest'})") == {"over": "rest"}

        # The next poll's `after` acknowledged them.
        token = page.evaluate("client.token")
        deadline = time.monotonic() + 10
        while queued(server, token) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queued(server, token) == []
        assert page.evaluate("transports") == ["poll"]
        assert page.evaluate("states")[:2] == ["connecting", "open"]


def test_the_client_returns_to_the_websocket_without_losing_or_repeating(
    server: Server, open_page: Any, deliver: Deliverer
) -> None:
    # Nothing listens on this port: every WebSocket is refused at first.
    page = open_page(server)
    start_client(
        page,
        wsUrl=f"ws://127.0.0.1:{free_port()}/ws/transport/",
        wsRetryDelay=300,
        wsRetryDelayMax=600,
    )
    session_id = wait_open(page, "poll")
    deliver(session_id, range(1, 4))
    wait_received(page, 3)

    # Allow the WebSocket while messages keep coming, so some arrive around
    # the switch, on either transport or both.
    page.evaluate("url => { window.wsUrl = url; }", server.ws_url)
    deliver(session_id, range(4, 10), pause=0.15)
    page.wait_for_function("client.transport === 'ws'")
    deliver(session_id, range(10, 12))

    received = wait_received(page, 11)
    assert [m["seq"] for m in received] == list(range(1, 12))
    assert numbers(received) == list(range(1, 12))
    assert page.evaluate("transports") == ["poll", "ws"]
    assert page.evaluate("client.action('echo', {over: 'ws'})") == {"over": "ws"}


def test_each_message_reaches_the_page_once_in_order_across_a_server_restart(
    open_page: Any, fresh_db: Callable[[], dict[str, str]], deliverers: Any
) -> None:
    env = fresh_db()
    deliver = deliverers(env)
    first = Server(env).start()
    second = Server(env, port=first.port)
    try:
        page = open_page(first)
        start_client(page, backoffInitial=200, backoffMax=1000, wsRetryDelay=1000)
        session_id = wait_open(page, "ws")
        deliver(session_id, range(1, 3))
        wait_received(page, 2)

        first.kill()
        page.wait_for_function("client.state !== 'open'")
        # Delivered while no server runs; an action asked meanwhile waits too.
        deliver(session_id, range(3, 6))
        page.evaluate("() => { window.outage = client.action('echo', {asked: 'offline'}); }")

        second.start()
        wait_received(page, 5)
        assert page.evaluate("window.outage") == {"asked": "offline"}
        deliver(session_id, range(6, 8))
        received = wait_received(page, 7)
        page.wait_for_function("client.transport === 'ws'")

        assert [m["seq"] for m in received] == list(range(1, 8))
        assert numbers(received) == list(range(1, 8))
        assert page.evaluate("client.sessionId") == session_id
    finally:
        second.stop()
        first.kill()


def test_the_page_drops_messages_it_already_has(
    server: Server, open_page: Any, deliver: Deliverer
) -> None:
    # Between page and server, every frame from the server comes twice, as
    # from a misbehaving proxy.
    def doubling(ws: Any) -> None:
        upstream = ws.connect_to_server()
        upstream.on_message(lambda frame: (ws.send(frame), ws.send(frame)))

    page = open_page(server)
    page.route_web_socket(server.ws_url, doubling)
    start_client(page)
    session_id = wait_open(page, "ws")

    deliver(session_id, range(1, 4))
    received = wait_received(page, 3)
    assert page.evaluate("client.action('echo', {once: true})") == {"once": True}
    page.wait_for_function("client.duplicates >= 3")
    assert [m["seq"] for m in page.evaluate("received")] == [1, 2, 3]
    assert numbers(received) == [1, 2, 3]


def test_a_burst_of_messages_stays_within_the_rate_limit(
    strict_server: Server, open_page: Any, deliverers: Any
) -> None:
    # Every frame the client sends counts against the limit (20/s here),
    # acks too: one ack per message would get the WebSocket closed with 4429.
    deliver = deliverers(strict_server.env)
    page = open_page(strict_server)
    start_client(page)
    session_id = wait_open(page, "ws")

    deliver(session_id, range(1, 151))
    received = wait_received(page, 150)

    assert numbers(received) == list(range(1, 151))
    assert page.evaluate("states") == ["connecting", "open"]
    assert page.evaluate("transports") == ["ws"]


@pytest.mark.parametrize("transports", [["ws"], ["poll"]])
def test_a_late_reply_still_settles_the_action(
    strict_server: Server, open_page: Any, transports: list[str]
) -> None:
    # The handler outlives the action timeout: the server answers `timeout`
    # (WebSocket) or 202 (REST), then delivers the reply to the mailbox.
    page = open_page(strict_server)
    start_client(page, transports=transports)
    wait_open(page, transports[0])

    reply = page.evaluate("client.action('test.work', {}, {timeout: 15000})")
    assert set(reply) == {"pid"}
    # The reply message (seq 2) settled the action; the page sees only the
    # handler's own message, now and later.
    assert page.evaluate("client.lastSeq") == 2
    page.wait_for_timeout(1000)
    received = page.evaluate("received")
    assert [m["message_type"] for m in received] == ["test.started"]


def test_tabs_sharing_a_session_do_not_take_turns_polling_in_a_tight_loop(
    server: Server, open_page: Any
) -> None:
    # Two tabs, one session through localStorage, both long-polling: each
    # new poll of the session answers the other's parked one at once.
    first = open_page(server)
    polls: list[str] = []
    first.context.on("request", lambda r: polls.append(r.url) if "/poll?" in r.url else None)
    start_client(first, transports=["poll"], storage="local")
    session_id = wait_open(first, "poll")
    second = first.context.new_page()
    second.goto(server.url + BLANK_PAGE)
    start_client(second, transports=["poll"], storage="local")
    assert wait_open(second, "poll") == session_id

    started = len(polls)
    second.wait_for_timeout(3000)
    # Backing off, they poll a handful of times, not hundreds.
    assert len(polls) - started < 40


def test_a_reloaded_page_resumes_its_session_without_repeats(
    server: Server, open_page: Any, deliver: Deliverer
) -> None:
    page = open_page(server)
    start_client(page)
    session_id = wait_open(page, "ws")
    deliver(session_id, range(1, 3))
    wait_received(page, 2)

    # sessionStorage keeps the token and last seq across the reload.
    page.reload()
    start_client(page)
    assert wait_open(page, "ws") == session_id
    deliver(session_id, range(3, 4))
    received = wait_received(page, 1)
    assert [m["seq"] for m in received] == [3]
    page.wait_for_timeout(1000)
    assert page.evaluate("received.length") == 1


def test_the_page_hears_of_a_gap_when_the_mailbox_overflowed(
    server: Server, open_page: Any, deliverers: Any
) -> None:
    # The overflow policy applies where deliver() runs: here, a process
    # whose mailboxes hold two messages.
    deliver = deliverers({**server.env, "TRANSPORT_MAILBOX_CAPACITY": "2"})
    page = open_page(server)
    start_client(page)
    session_id = wait_open(page, "ws")

    # While the page is away, four messages come: the oldest two are lost.
    page.evaluate("client.close()")
    deliver(session_id, range(1, 5))
    page.evaluate("() => { client.start(); }")
    received = wait_received(page, 2)

    assert [m["seq"] for m in received] == [3, 4]
    assert page.evaluate("gaps") == 1


def test_the_demo_page_chats_between_two_tabs(server: Server, open_page: Any) -> None:
    first = open_page(server, "/transport/demo/")
    first.wait_for_function("transportClient.state === 'open'")
    first_id = first.evaluate("transportClient.sessionId")

    # The invitation link names the first tab, so the second can answer it.
    second = open_page(server, first.eval_on_selector("#invite", "a => a.href"))
    second.wait_for_function("transportClient.state === 'open'")
    assert second.input_value("#to") == first_id

    second.fill("#text", "Hello from the second tab")
    second.click("#send-button")
    first.wait_for_selector("#messages li:not(.sent) >> text=Hello from the second tab")
    # A message from a tab fills in whom to answer.
    assert first.input_value("#to") == second.evaluate("transportClient.sessionId")
    first.fill("#text", "Hi! Both of us are on the WebSocket.")
    first.click("#send-button")
    second.wait_for_selector("#messages li:not(.sent) >> text=Both of us")
    first.wait_for_selector("#messages li.sent")

    assert first.text_content("#state") == "open"
    assert first.text_content("#transport") == "WebSocket"
    ARTIFACTS.mkdir(exist_ok=True)
    first.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
