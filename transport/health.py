"""Health checks for load balancers and orchestrators."""

import asyncio

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, JsonResponse

# A readiness probe must answer well inside a typical 5 s probe timeout.
READY_TIMEOUT = 2.0


async def healthz(request: HttpRequest) -> JsonResponse:
    """Called by liveness probes: the process answers."""
    return JsonResponse({"status": "ok"})


def _database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _layer_answers() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer configured")
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "readyz.check"})
    await layer.receive(channel)


async def readyz(request: HttpRequest) -> JsonResponse:
    """Called by readiness probes: 200 when the database and channel layer answer."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", database_sync_to_async(_database_answers)),
        ("channel_layer", _layer_answers),
    ):
        try:
            await asyncio.wait_for(probe(), READY_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"failed: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JsonResponse({"ready": ready, "checks": checks}, status=200 if ready else 503)
