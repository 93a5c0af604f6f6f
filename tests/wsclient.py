"""A real WebSocket client's conversation with a real server process."""

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection

# Generous: a loaded 2-core machine answers slowly, never this slowly.
RECV_TIMEOUT = 15.0


async def send(ws: ClientConnection, frame: dict[str, Any] | str) -> None:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))


async def recv(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def hello(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send hello and return the welcome."""
    await send(ws, {"type": "hello", **fields})
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    return welcome
