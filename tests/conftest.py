"""Fixtures shared by the whole suite: settings, clients, real server processes."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from config.asgi import application
from transport import ratelimit

# The one hypothesis profile of the suite (property tests and schemathesis):
# no per-example deadline, since a loaded 2-core machine stalls now and then;
# no example database, so a run never depends on an earlier run's files.
# Test modules set max_examples themselves, to keep the suite's time.
hypothesis_settings.register_profile(
    "transport",
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
hypothesis_settings.load_profile("transport")


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
