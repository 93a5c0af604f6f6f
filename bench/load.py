"""The load client: asyncio, loopback only, every loop bounded in count and time.

Each scenario takes the running server and its sizes and returns its
figures: throughput, latency percentiles in milliseconds, the server's CPU
per operation (utime + stime from /proc, the steadiest figure) and memory.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect

from bench.procs import HOST, Running, cpu_seconds, memory_kib, open_files_limit

Figures = dict[str, float | int | None]

PAYLOAD = "x" * 100
# Handshakes in flight at once while opening many connections, as a
# balancer's or a browser fleet's would be spread, not a SYN flood.
CONNECT_CONCURRENCY = 50
# One client's long-poll: far from the server's cap, far past any scenario.
POLL_TIMEOUT = 30

now = time.monotonic  # CLOCK_MONOTONIC: the clock the bench actions stamp with


class WrongReply(AssertionError):
    """The server answered something other than what was asked."""

    def __init__(self, got: object) -> None:
        super().__init__(f"unexpected answer {got!r}"[:300])


def pct(samples: list[float], p: float) -> float | None:
    """Return the p-th percentile of durations in seconds, in milliseconds."""
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000, 3)


def latency(samples: list[float], *ps: float) -> Figures:
    return {f"p{p:g}_ms": pct(samples, p) for p in ps}


def hwm_mib(server: Running) -> float:
    return round(memory_kib(server.pid, "VmHWM") / 1024, 1)


# --- WebSocket connections -----------------------------------------------------


class Conn:
    """One WebSocket: replies matched to requests by id, pushes handed to a callback.

    Ours speaks the protocol (hello, then `echo` actions answered by
    `reply`, messages acked one by one); the bare consumer echoes
    `{"id", "payload"}` back with `"ok": true`.
    """

    def __init__(
        self, ws: ClientConnection, ours: bool, on_message: Callable[[Any], None] | None
    ) -> None:
        self.ws = ws
        self.ours = ours
        self.on_message = on_message
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.session_id = ""
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, server: Running, on_message: Callable[[Any], None] | None = None
    ) -> "Conn":
        ours = server.target.kind == "transport"
        path = "/ws/transport/" if ours else "/ws/echo/"
        ws = await connect(
            f"ws://{HOST}:{server.port}{path}",
            compression=None,
            open_timeout=30,
            ping_interval=None,
            proxy=None,
        )
        conn = cls(ws, ours, on_message)
        if ours:
            welcome = await conn._request("hello", {"type": "hello"})
            conn.session_id = welcome["session_id"]
        return conn

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    if self.on_message is not None:
                        self.on_message(frame)
                    await self.ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
                    continue
                key = "hello" if kind == "welcome" else str(frame.get("id"))
                future = self.pending.pop(key, None)
                if future is not None and not future.done():
                    future.set_result(frame)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("websocket closed"))

    async def _request(self, key: str, frame: dict[str, Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        await self.ws.send(json.dumps(frame))
        return await future

    async def action(self, ref: str, name: str, payload: dict[str, Any]) -> Any:
        """Send one action of ours and return the reply's payload."""
        frame = {"type": "action", "id": ref, "action": name, "payload": payload}
        reply = await self._request(ref, frame)
        if not reply.get("ok"):
            raise WrongReply(reply)
        return reply["payload"]

    async def echo(self, ref: str) -> None:
        """Make one echo round trip and check the answer."""
        if self.ours:
            answer = await self.action(ref, "echo", {"payload": PAYLOAD})
            if answer != {"payload": PAYLOAD}:
                raise WrongReply(answer)
            return
        reply = await self._request(ref, {"id": ref, "payload": PAYLOAD})
        if not reply.get("ok") or reply.get("payload") != PAYLOAD:
            raise WrongReply(reply)

    async def close(self) -> None:
        await self.ws.close()


class SioConn:
    """A python-socketio client: `echo` events answered by an ack, as its peers test it."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    async def open(cls, server: Running, transport: str = "websocket") -> "SioConn":
        import socketio

        client = socketio.AsyncClient(reconnection=False)
        url = f"http://{HOST}:{server.port}"
        await client.connect(url, transports=[transport], wait_timeout=30)
        return cls(client)

    async def echo(self, ref: str) -> None:
        reply = await self.client.call("echo", {"id": ref, "payload": PAYLOAD}, timeout=30)
        if not reply.get("ok") or reply.get("payload") != PAYLOAD:
            raise WrongReply(reply)

    async def close(self) -> None:
        # Over long-poll, disconnect() waits on the parked GET; its HTTP
        # session is closed regardless, or aiohttp warns at exit.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.client.disconnect(), 2)
        http = getattr(self.client.eio, "http", None)
        if http is not None and not http.closed:
            await http.close()


AnyConn = Conn | SioConn


async def open_many(
    server: Running, count: int, on_message: Callable[[Any], None] | None = None
) -> tuple[list[Any], float]:
    """Open `count` connections, CONNECT_CONCURRENCY handshakes at a time; time it."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> AnyConn:
        async with gate:
            if server.target.kind == "socketio":
                return await SioConn.open(server)
            return await Conn.open(server, on_message)

    started = now()
    conns = await asyncio.gather(*(one() for _ in range(count)))
    return conns, now() - started


async def close_many(conns: list[AnyConn]) -> None:
    """Close politely, but give up after a few seconds: the server is stopped next."""
    if conns:
        await asyncio.wait([asyncio.create_task(c.close()) for c in conns], timeout=5)


# --- scenarios ---------------------------------------------------------------


async def echo(
    server: Running, conns: int, trips: int, inflight: int, *, window: float
) -> Figures:
    """Scenario 1: `trips` echo round trips per connection, `inflight` at once on each.

    A slow server stops being asked after `window` seconds; the figures
    count the round trips made by then.
    """
    opened, connect_s = await open_many(server, conns)
    samples: list[float] = []
    errors = 0
    deadline = now() + window

    async def worker(conn: AnyConn, lane: int, count: int) -> None:
        nonlocal errors
        for i in range(count):
            if now() > deadline:
                return
            started = now()
            try:
                await conn.echo(f"{lane}-{i}")
            except (WrongReply, ConnectionError, OSError):
                errors += 1
                continue
            samples.append(now() - started)

    per_lane = trips // inflight
    cpu, started = cpu_seconds(server.pid), now()
    await asyncio.gather(*(worker(c, lane, per_lane) for c in opened for lane in range(inflight)))
    wall, cpu = now() - started, cpu_seconds(server.pid) - cpu
    await close_many(opened)
    return {
        "rt_s": round(len(samples) / wall),
        "trips": len(samples),
        **latency(samples, 50, 95, 99),
        "srv_us_per_rt": round(cpu / max(1, len(samples)) * 1e6, 1),
        "connect_s": round(connect_s, 3),
        "errors": errors,
        "hwm_mib": hwm_mib(server),
    }


async def delivery(
    server: Running, sessions: int, rate: int, seconds: float, *, window: float
) -> Figures:
    """Scenario 2: deliver() at `rate` a second, round-robin to open WebSockets, acked."""
    count = int(rate * seconds)
    samples: list[float] = []
    stamps: list[float] = []
    all_in = asyncio.Event()

    def received(frame: Any) -> None:
        samples.append(now() - frame["payload"]["t"])
        stamps.append(frame["payload"]["t"])
        if len(samples) >= count:
            all_in.set()

    opened, connect_s = await open_many(server, sessions, received)
    ids = [c.session_id for c in opened]
    cpu, started = cpu_seconds(server.pid), now()
    burst = {"sessions": ids, "count": count, "rate": rate}
    await opened[0].action("burst", "bench.deliver_burst", burst)
    with contextlib.suppress(TimeoutError):
        # Bounded: a server that cannot keep up shows as fewer received.
        await asyncio.wait_for(all_in.wait(), seconds * 4 + 30)
    wall, cpu = now() - started, cpu_seconds(server.pid) - cpu
    await close_many(opened)
    spread = max(stamps) - min(stamps) if len(stamps) > 1 else 0
    return {
        "sent": count,
        "received": len(samples),
        "enqueued_s": round((len(stamps) - 1) / spread) if spread else None,
        **latency(samples, 50, 95, 99),
        "srv_us_per_msg": round(cpu / max(1, len(samples)) * 1e6, 1),
        "wall_s": round(wall, 3),
        "connect_s": round(connect_s, 3),
        "hwm_mib": hwm_mib(server),
    }


async def idle(server: Running, conns: int, *, window: float) -> Figures:
    """Scenario 4: server RSS growth per open (and, for ours, welcomed) WebSocket."""
    # Lazy imports and first-use caches are not per connection.
    [warm], _ = await open_many(server, 1)
    await warm.close()
    await asyncio.sleep(1)
    rss = memory_kib(server.pid)
    opened, connect_s = await open_many(server, conns)
    await asyncio.sleep(2)
    grown = memory_kib(server.pid)
    await close_many(opened)
    return {
        "kib_per_conn": round((grown - rss) / conns, 1),
        "rss_mib": round(grown / 1024, 1),
        "connect_s": round(connect_s, 3),
        "hwm_mib": hwm_mib(server),
        "server_fd_limit": open_files_limit(server.pid),
    }


# --- HTTP: ours is the REST long-poll, the bare consumer's an async view -------


class Rest:
    """One REST session of ours: its bearer token and its actions."""

    def __init__(self, http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> None:
        self.http = http
        self.base = base
        self.session_id: str = body["session_id"]
        self.headers = {"Authorization": f"Bearer {body['token']}"}
        self.sent = 0

    @classmethod
    async def create(cls, http: aiohttp.ClientSession, base: str) -> "Rest":
        async with http.post(f"{base}/transport/sessions", json={}) as response:
            if response.status != 201:
                raise WrongReply(await response.text())
            return cls(http, base, json.loads(await response.read()))

    async def action(self, name: str, payload: dict[str, Any]) -> Any:
        self.sent += 1
        body = {"id": f"a{self.sent}", "action": name, "payload": payload}
        url = f"{self.base}/transport/actions"
        async with self.http.post(url, json=body, headers=self.headers) as response:
            reply = json.loads(await response.read())
        if response.status != 200 or not reply.get("ok"):
            raise WrongReply(reply)
        return reply["payload"]

    async def poll(self, after: int, timeout: float) -> Any:
        url = f"{self.base}/transport/poll?after={after}&timeout={timeout:g}"
        async with self.http.get(url, headers=self.headers) as response:
            body = json.loads(await response.read())
        if response.status != 200:
            raise WrongReply(body)
        return body


def http_client() -> aiohttp.ClientSession:
    # No pool limit: scenario 3 holds hundreds of parked requests at once.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def gather_bounded(count: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(i: int) -> Any:
        async with gate:
            return await make(i)

    return await asyncio.gather(*(one(i) for i in range(count)))


async def wait_parked(count: int, parked: Callable[[], Awaitable[int]], limit: float) -> float:
    """Wait until `count` polls are parked in the server; return how long it took."""
    started = now()
    while await parked() < count:
        if now() - started > limit:
            raise TimeoutError(f"fewer than {count} polls parked after {limit} s")
        await asyncio.sleep(0.05)
    return now() - started


async def lp_wake(server: Running, polls: int, *, window: float) -> Figures:
    """Scenario 3: `polls` parked long-polls, each woken by one delivery.

    Ours: the deliveries run on a thread of the server (bench.deliver_burst,
    as fast as they go) and latency runs from each enqueue. The bare
    consumer: 50 POSTs at a time push to its in-memory boxes, and latency
    runs from the client's POST.
    """
    samples: list[float] = []
    base = f"http://{HOST}:{server.port}"
    async with http_client() as http:
        if server.target.kind == "transport":
            sessions = await gather_bounded(polls, lambda i: Rest.create(http, base))
            control = await Rest.create(http, base)

            async def park(i: int) -> None:
                body = await sessions[i].poll(0, POLL_TIMEOUT)
                samples.extend(now() - m["payload"]["t"] for m in body["messages"])

            async def parked() -> int:
                return int((await control.action("bench.parked", {}))["parked"])

            async def wake() -> None:
                ids = [s.session_id for s in sessions]
                await control.action("bench.deliver_burst", {"sessions": ids, "count": polls})

        else:
            run = f"{time.time_ns():x}"

            async def park(i: int) -> None:
                async with http.get(f"{base}/lp/{run}-{i}/?timeout={POLL_TIMEOUT}") as response:
                    body = json.loads(await response.read())
                samples.extend(now() - m["t"] for m in body["messages"])

            async def parked() -> int:
                async with http.get(f"{base}/lp/stats/") as response:
                    return int(json.loads(await response.read())["parked"])

            async def push(i: int) -> None:
                async with http.post(f"{base}/lp/{run}-{i}/", json={"t": now()}) as response:
                    await response.read()

            async def wake() -> None:
                await gather_bounded(polls, push)

        tasks = [asyncio.create_task(park(i)) for i in range(polls)]
        try:
            park_s = await wait_parked(polls, parked, POLL_TIMEOUT / 2)
            started = now()
            await wake()
            await asyncio.wait_for(asyncio.gather(*tasks), POLL_TIMEOUT)
            fanout_s = now() - started
        finally:
            for task in tasks:
                task.cancel()
    return {
        "woken": len(samples),
        **latency(samples, 50, 99),
        "fanout_s": round(fanout_s, 3),
        "park_s": round(park_s, 3),
        "hwm_mib": hwm_mib(server),
    }


async def lp_loop(server: Running, clients: int, trips: int, *, window: float) -> Figures:
    """Scenario 3: message round trips over long-poll, one after another per client.

    Ours: action `bench.push` (the server delivers to the asking session)
    and the poll that returns the message and acknowledges the one before.
    The bare consumer: a POST to its own box and the GET that returns it.
    """
    samples: list[float] = []
    base = f"http://{HOST}:{server.port}"
    async with http_client() as http:
        if server.target.kind == "transport":
            sessions = await gather_bounded(clients, lambda i: Rest.create(http, base))
        elif server.target.kind == "socketio":
            polling = [await SioConn.open(server, "polling") for _ in range(clients)]
        deadline = now() + window
        if server.target.kind == "transport":

            async def loop(i: int) -> None:
                rest, after = sessions[i], 0
                for j in range(trips):
                    if now() > deadline:
                        return
                    started = now()
                    await rest.action("bench.push", {"j": j})
                    body = await rest.poll(after, 5)
                    if [m["payload"]["j"] for m in body["messages"]] != [j]:
                        raise WrongReply(body)
                    after = body["next_after"]
                    samples.append(now() - started)

        elif server.target.kind == "socketio":
            # python-socketio over long-poll: call() with an ack is a POST
            # up and the parked GET returning the ack.

            async def loop(i: int) -> None:
                for j in range(trips):
                    if now() > deadline:
                        return
                    started = now()
                    await polling[i].echo(str(j))
                    samples.append(now() - started)

        else:
            run = f"{time.time_ns():x}"

            async def loop(i: int) -> None:
                url = f"{base}/lp/{run}-{i}/"
                for j in range(trips):
                    if now() > deadline:
                        return
                    started = now()
                    async with http.post(url, json={"j": j}) as response:
                        await response.read()
                    async with http.get(f"{url}?timeout=5") as response:
                        body = json.loads(await response.read())
                    if body["messages"] != [{"j": j}]:
                        raise WrongReply(body)
                    samples.append(now() - started)

        try:
            return await _timed_http(server, clients, loop, samples)
        finally:
            if server.target.kind == "socketio":
                await close_many(list(polling))


async def rest_echo(server: Running, clients: int, trips: int, *, window: float) -> Figures:
    """Scenario 3: REST `echo` actions of ours, one request each, the reply in the response."""
    samples: list[float] = []
    base = f"http://{HOST}:{server.port}"
    async with http_client() as http:
        sessions = await gather_bounded(clients, lambda i: Rest.create(http, base))
        deadline = now() + window

        async def loop(i: int) -> None:
            rest = sessions[i]
            for _ in range(trips):
                if now() > deadline:
                    return
                started = now()
                if await rest.action("echo", {"payload": PAYLOAD}) != {"payload": PAYLOAD}:
                    raise WrongReply("echo")
                samples.append(now() - started)

        return await _timed_http(server, clients, loop, samples)


async def _timed_http(
    server: Running,
    clients: int,
    loop: Callable[[int], Awaitable[None]],
    samples: list[float],
) -> Figures:
    cpu, started = cpu_seconds(server.pid), now()
    await asyncio.gather(*(loop(i) for i in range(clients)))
    wall, cpu = now() - started, cpu_seconds(server.pid) - cpu
    return {
        "rt_s": round(len(samples) / wall),
        "trips": len(samples),
        **latency(samples, 50, 99),
        "srv_us_per_rt": round(cpu / max(1, len(samples)) * 1e6, 1),
    }
