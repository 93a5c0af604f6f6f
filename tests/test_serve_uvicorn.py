"""`manage.py serve --server uvicorn` speaks the protocol with daphne's limits."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.procs import Running, Target, migrated_template

pytestmark = pytest.mark.process


@pytest.fixture
def uvicorn_server(tmp_path: Path) -> Iterator[Running]:
    server = Running(Target("transport", "uvicorn"), migrated_template(tmp_path), tmp_path, "INFO")
    yield server
    server.stop()


async def test_uvicorn_answers_actions_and_closes_on_an_oversized_frame_with_1009(
    uvicorn_server: Running,
) -> None:
    url = f"ws://127.0.0.1:{uvicorn_server.port}/ws/transport/"
    async with connect(url, proxy=None, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
        await ws.send(json.dumps({"type": "action", "id": "a", "action": "echo", "payload": {}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply == {"type": "reply", "id": "a", "ok": True, "payload": {}}

        # One byte over TRANSPORT_MAX_FRAME_BYTES (64 KiB by default).
        await ws.send("x" * (65536 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
