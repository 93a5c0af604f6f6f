"""Who a client is: its address, and the network it is counted by.

The address is the socket's peer, unless that peer is one of
TRANSPORT_TRUSTED_PROXIES. Then `X-Forwarded-For` is read from the right,
skipping trusted proxies, and the first other address is the client: a
client may write anything into the header, so only what trusted proxies
appended is believed.

Limits count a client's network (TRANSPORT_CLIENT_IPV4_PREFIX, /24, and
TRANSPORT_CLIENT_IPV6_PREFIX, /56, by default), not its address: one host
usually owns a whole IPv6 /64 or more and could otherwise rotate through
addresses to dodge its limit.
"""

import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.http import HttpRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The bucket of clients whose address cannot be parsed (a Unix socket, a
# garbled header): they share one budget rather than escape it.
UNKNOWN = "unknown"


# Every request and connection parses its peer's address, and most come from
# a few proxies or a few clients; the ipaddress module's parse costs more
# than the rest of the rate limit check.
@lru_cache(maxsize=4096)
def parse(value: str | None) -> IPAddress | None:
    """Return an address from `192.0.2.1`, `[2001:db8::1]:443` or `192.0.2.1:80`, else None."""
    text = (value or "").strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=8)
def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value)


def within(address: IPAddress, networks: Iterable[str]) -> bool:
    """Tell whether an address is in one of the networks (`10.0.0.0/8`, `::1`)."""
    return any(address in network for network in _networks(tuple(networks)))


def address(peer: str | None, forwarded_for: str | None) -> str | None:
    """Return the client's address, believing X-Forwarded-For only from trusted proxies."""
    ip = parse(peer)
    trusted = settings.TRANSPORT_TRUSTED_PROXIES
    if ip is None or not forwarded_for or not trusted or not within(ip, trusted):
        return str(ip) if ip is not None else peer
    hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        ip = parse(hop)
        if ip is None:
            # Trusted proxies append parseable addresses; this came from
            # the client itself, so the client is not known.
            return None
        if not within(ip, trusted):
            break
    return str(ip)


def of_scope(scope: dict[str, Any]) -> str | None:
    """Return the address of an ASGI connection's client."""
    peer = (scope.get("client") or [None])[0]
    forwarded = [
        value.decode("latin1")
        for name, value in scope.get("headers", ())
        if name.lower() == b"x-forwarded-for"
    ]
    return address(peer, ",".join(forwarded))


def of_request(request: HttpRequest) -> str | None:
    """Return the address of an HTTP request's client."""
    return address(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def network_of(client: str | None) -> str:
    """Return the client's network prefix, e.g. `192.0.2.0/24`."""
    ip = parse(client)
    if ip is None:
        return UNKNOWN
    if ip.version == 4:
        prefix = settings.TRANSPORT_CLIENT_IPV4_PREFIX
    else:
        prefix = settings.TRANSPORT_CLIENT_IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
