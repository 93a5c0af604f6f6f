"""Rate limits per transport and client network, on the `limits` library.

Clients are grouped by network prefix (transport.clients: IPv4 /24 and
IPv6 /56 by default), so one host cannot dodge its limit by rotating
through the addresses it owns. Buckets live in process memory, or in Redis
when REDIS_URL is set, so that every server process shares them.
"""

import math
import re
import time
from dataclasses import dataclass

from django.conf import settings
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from transport import signals
from transport.clients import network_of
from transport.errors import RateLimited

_UNITS = {"s": "second", "m": "minute", "h": "hour"}


class InvalidRateLimits(ValueError):
    """TRANSPORT_RATE_LIMITS is not of the form `ws=50/s,rest=20/s`."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"TRANSPORT_RATE_LIMITS={value!r}: expected e.g. 'ws=50/s,rest=20/s' or 'off'"
        )


def parse_limits(value: str) -> dict[str, RateLimitItem]:
    """Parse `ws=50/s,rest=20/s` into a limit per transport ({} for `off`)."""
    value = value.strip()
    if value.lower() in ("", "off", "none"):
        return {}
    items: dict[str, RateLimitItem] = {}
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*/\s*(\w+)\s*", part)
        if not match:
            raise InvalidRateLimits(value)
        transport, amount, unit = match.groups()
        try:
            items[transport] = parse(f"{amount}/{_UNITS.get(unit, unit)}")
        except ValueError:
            raise InvalidRateLimits(value) from None
    return items


@dataclass
class Limiter:
    """Moving-window limits, one per transport, keyed by client network."""

    limits: dict[str, RateLimitItem]
    storage: Storage

    def __post_init__(self) -> None:
        self.strategy = MovingWindowRateLimiter(self.storage)

    async def hit(self, transport: str, address: str | None) -> None:
        """Count one request; raise RateLimited with the retry delay when over."""
        item = self.limits.get(transport)
        if item is None:
            return
        network = network_of(address)
        if await self.strategy.hit(item, transport, network):
            return
        stats = await self.strategy.get_window_stats(item, transport, network)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        signals.rate_limited.send_robust(
            sender=Limiter, transport=transport, network=network, retry_after=retry_after
        )
        raise RateLimited(retry_after)


_limiter: Limiter | None = None


def get_limiter() -> Limiter:
    """Return the process's limiter, built from settings on first use."""
    global _limiter
    if _limiter is None:
        storage: Storage
        if settings.REDIS_URL:
            uri = "async+" + settings.REDIS_URL
            shared = storage_from_string(uri, implementation="redispy")
            assert isinstance(shared, Storage), uri
            storage = shared
        else:
            storage = MemoryStorage()
        _limiter = Limiter(parse_limits(settings.TRANSPORT_RATE_LIMITS), storage)
    return _limiter


def reset() -> None:
    """Forget the limiter, so the next use reads settings again (tests)."""
    global _limiter
    _limiter = None
