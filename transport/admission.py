"""WebSockets open per client network in this process, for the connection limit.

The count is per server process, like the connections themselves: a
process's memory is what the limit protects. With N processes behind a
balancer one network may hold N times TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK.
"""

import weakref

from django.conf import settings


class OpenConnections:
    """The open connections of each client network, held weakly.

    Consumers release their slot on disconnect; holding them weakly means a
    consumer that died without a disconnect (a crashed application
    instance) frees its slot anyway once it is collected.
    """

    def __init__(self) -> None:
        self._by_network: dict[str, weakref.WeakSet[object]] = {}

    def admit(self, network: str, connection: object) -> bool:
        """Count a new connection, or tell that its network is at the limit."""
        limit = settings.TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK
        peers = self._by_network.setdefault(network, weakref.WeakSet())
        if 0 < limit <= len(peers):
            return False
        peers.add(connection)
        return True

    def release(self, network: str, connection: object) -> None:
        """Free a connection's slot (idempotent)."""
        peers = self._by_network.get(network)
        if peers is None:
            return
        peers.discard(connection)
        if not peers:
            del self._by_network[network]

    def count(self, network: str) -> int:
        peers = self._by_network.get(network)
        return len(peers) if peers is not None else 0


open_connections = OpenConnections()
