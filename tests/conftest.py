"""Fixtures shared by the whole suite: settings, clients, real server processes."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from config.asgi import application
from transport import ratelimit


@pytest.fixture(autouse=True)
def _no_rate_limits(settings: Any) -> Iterator[None]:
    """Switch rate limits off unless a test sets them; tests send bursts from one host."""
    settings.TRANSPORT_RATE_LIMITS = "off"
    ratelimit.reset()
    yield
    ratelimit.reset()


@pytest.fixture
def use_rate_limits(settings: Any) -> Any:
    """Return a function that turns on the given limits, e.g. `ws=5/s`."""

    def apply(value: str) -> None:
        settings.TRANSPORT_RATE_LIMITS = value
        ratelimit.reset()

    return apply


@pytest.fixture
async def ws() -> AsyncIterator[Any]:
    """Yield a factory of WebSocket communicators on /ws/transport/, closed afterwards."""
    opened: list[WebsocketCommunicator] = []

    async def connect(client: str = "127.0.0.1") -> WebsocketCommunicator:
        comm = WebsocketCommunicator(application, "/ws/transport/")
        comm.scope["client"] = (client, 50000)
        connected, _ = await comm.connect()
        assert connected
        opened.append(comm)
        return comm

    yield connect
    for comm in opened:
        await comm.disconnect()
