"""Publish the plan's events to StatsD when STATSD_HOST is set.

Each event is one UDP datagram on a non-blocking socket: a StatsD server
that is down, slow or unreachable costs a failed sendto() and nothing more.
The host name is resolved once, when the first event is published; a name
that does not resolve turns publishing off for the process, with a warning.
"""

import logging
import re
import threading

from django.conf import settings
from statsd import StatsClient

logger = logging.getLogger(__name__)

# StatsD separates a name from its value with ':' and its type with '|', and
# the client sends ASCII: anything else in a label value becomes '_'. Dots
# would nest an action name like `cart.add` one level deeper, so they go too.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")

_client: StatsClient | None = None
_resolved = False
_lock = threading.Lock()


def part(value: str) -> str:
    """Return a label value made safe as one segment of a StatsD name."""
    return _UNSAFE.sub("_", value) or "_"


def client() -> StatsClient | None:
    """Return the process's StatsD client, or None when publishing is off."""
    global _client, _resolved
    if _resolved:
        return _client
    with _lock:
        if not _resolved:
            _client = _connect()
            _resolved = True
    return _client


def _connect() -> StatsClient | None:
    if not settings.STATSD_HOST:
        return None
    try:
        publisher = StatsClient(
            settings.STATSD_HOST, settings.STATSD_PORT, prefix=settings.STATSD_PREFIX or None
        )
    except OSError:
        logger.warning("StatsD host does not resolve; not publishing", exc_info=True)
        return None
    publisher._sock.setblocking(False)
    return publisher


def reset() -> None:
    """Forget the client, so the next event reads settings again (tests)."""
    global _client, _resolved
    with _lock:
        if _client is not None:
            _client.close()
        _client, _resolved = None, False


def incr(name: str, count: int = 1) -> None:
    if (c := client()) is not None:
        c.incr(name, count)


def gauge(name: str, value: float) -> None:
    if (c := client()) is not None:
        c.gauge(name, value)


def timing(name: str, ms: float) -> None:
    if (c := client()) is not None:
        c.timing(name, ms)
