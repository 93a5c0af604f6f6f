"""Measure sequential echo round trips per second over one WebSocket.

Starts a real `manage.py serve` (daphne) on a fresh, migrated SQLite file,
so the figure includes everything a client pays for: the network stack,
daphne, the consumer, the router, the in-process worker and the
idempotency record each action writes. Run it as

    .venv/bin/python -m bench.echo_rtt [--count N]
"""

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from tests.helpers import Server, migrated_sqlite

DEFAULT_COUNT = 2000


class WrongReply(AssertionError):
    """The server answered an echo with something other than its payload."""

    def __init__(self, expected: object, got: object) -> None:
        super().__init__(f"expected {expected!r}, got {got!r}")


def open_ws(server: Server) -> connect:
    """Connect without proxies or compression, so frames go as they are written."""
    return connect(server.ws_url, proxy=None, compression=None, open_timeout=10)


async def echo_round_trips(ws: ClientConnection, count: int) -> float:
    """Send `count` echo actions one after another; return round trips per second.

    Each action waits for its reply before the next goes out, so the figure
    is the inverse of the latency, not the throughput of a pipelined client.
    """
    started = time.perf_counter()
    for i in range(count):
        payload = {"i": i}
        await ws.send(
            json.dumps({"type": "action", "id": f"e{i}", "action": "echo", "payload": payload})
        )
        reply = json.loads(await ws.recv())
        expected = {"type": "reply", "id": f"e{i}", "ok": True, "payload": payload}
        if reply != expected:
            raise WrongReply(expected, reply)
    return count / (time.perf_counter() - started)


async def measure(server: Server, count: int) -> float:
    """Open a session on `server` and measure `count` echo round trips."""
    async with open_ws(server) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            raise WrongReply({"type": "welcome"}, welcome)
        return await echo_round_trips(ws, count)


def main() -> None:
    """Start a server, measure, print the figure, stop the server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = migrated_sqlite(Path(tmp) / "db.sqlite3")
        server = Server({**env, "SERVER_LOG": str(Path(tmp) / "server.log")}).start()
        try:
            rate = asyncio.run(measure(server, args.count))
        finally:
            server.stop()
    print(f"echo over one WebSocket: {args.count} round trips, {rate:.0f} per second")


if __name__ == "__main__":
    main()
