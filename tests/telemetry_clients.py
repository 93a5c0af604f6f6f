"""Plain clients of a real server process for the telemetry tests."""

import json
import urllib.error
import urllib.request
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.helpers import Server
from tests.scrape import Scrape, parse

# urllib must not route loopback requests through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    server: Server, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    """Make one request; return the status and the decoded JSON body (or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data, headers, method=method)
    try:
        with _opener.open(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw) if raw else None


def scrape(server: Server) -> Scrape:
    with _opener.open(server.url + "/metrics", timeout=30) as response:
        return parse(response.read().decode())


async def open_ws(server: Server) -> ClientConnection:
    return await connect(server.ws_url, proxy=None, compression=None, open_timeout=10)


async def exchange(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a frame and return the next frame the server sends."""
    await ws.send(json.dumps(frame))
    answer: dict[str, Any] = json.loads(await ws.recv())
    return answer
