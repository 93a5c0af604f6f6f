"""Database connection upkeep without a thread hop per request.

Django closes unusable or expired connections at the start and end of
every request, and clears the debug query log at the start, from a
thread: under ASGI that is two hops to the database thread per request,
about as much work as a long-poll itself. Every database call of the
transport goes through channels' database_sync_to_async, which runs the
same connection upkeep in the thread it already uses. So the hops are
skipped for the transport's own async views, and kept for everything else
(the admin's sync views).
"""

from typing import Any

from channels.db import database_sync_to_async
from django.core import signals
from django.db import close_old_connections, reset_queries

# Paths served only by async views whose database calls do their own upkeep.
_SELF_MAINTAINED = ("/transport/", "/healthz", "/readyz")

# database_sync_to_async closes old connections around what it runs.
_upkeep = database_sync_to_async(reset_queries)


async def _before_request(sender: Any, scope: dict[str, Any] | None = None, **kw: Any) -> None:
    path = (scope or {}).get("path", "")
    if not path.startswith(_SELF_MAINTAINED):
        await _upkeep()


def install() -> None:
    """Replace Django's per-request connection upkeep with the scoped one."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_started.disconnect(reset_queries)
    signals.request_finished.disconnect(close_old_connections)
    signals.request_started.connect(_before_request, dispatch_uid="transport.connections")
