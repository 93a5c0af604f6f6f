"""Serve the REST API through a short middleware chain of its own.

Django runs each hook of a middleware that is not async-capable through a
thread hop. The site's full chain (sessions, CSRF, auth, messages, ...)
cost about 26 hops and most of the CPU of an API request, for nothing the
API uses: it authenticates by bearer token and needs no CSRF check. The
API keeps the middleware that observes it, all async: tracing, request
logging, and Prometheus's request metrics (telemetry.middleware).
"""

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

# Paths of the API; the demo page is a page of the site and keeps its chain.
API_PREFIXES = ("/transport/", "/healthz", "/readyz")
SITE_PREFIXES = ("/transport/demo",)

# The middleware the API keeps, with the async stand-ins some of them get.
API_MIDDLEWARE = {
    "django_prometheus.middleware.PrometheusBeforeMiddleware": (
        "telemetry.middleware.PrometheusBefore"
    ),
    "django_prometheus.middleware.PrometheusAfterMiddleware": (
        "telemetry.middleware.PrometheusAfter"
    ),
    "telemetry.middleware.RequestLogging": "telemetry.middleware.APIRequestLogging",
    "telemetry.middleware.TracingMiddleware": "telemetry.middleware.TracingMiddleware",
}

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class APIHandler(ASGIHandler):
    """Django's ASGI handler with the API's middleware chain."""

    def load_middleware(self, is_async: bool = False) -> None:
        """Build the chain from the site's MIDDLEWARE, kept in its order.

        BaseHandler reads settings.MIDDLEWARE itself; it is swapped for the
        API's list while the chain is built, at startup, then put back.
        """
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = [API_MIDDLEWARE[m] for m in full if m in API_MIDDLEWARE]
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


def split(site: ASGIApp, api: ASGIApp) -> ASGIApp:
    """Return an ASGI app sending API paths to `api` and the rest to `site`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope.get("path", "")
        if path.startswith(API_PREFIXES) and not path.startswith(SITE_PREFIXES):
            await _on_shared_database_thread(api, scope, receive, send)
        else:
            await site(scope, receive, send)

    return app


async def _on_shared_database_thread(
    api: ASGIApp, scope: dict[str, Any], receive: Any, send: Any
) -> None:
    """Serve an API request whose database calls run on the process's one database thread.

    Django's handler gives every request a thread-sensitive context, so each
    request's database calls ran on a thread made for it, which opened a
    database connection of its own. On SQLite those connections then queued
    for the write lock in the database's busy loop, which sleeps in steps of
    up to 100 ms. An empty context here is one Django's handler keeps, so the
    calls go to asgiref's process-wide thread, like the WebSocket's: one
    connection, kept open, and no lock contention within the process.
    Tasks that outlive the request (late replies, group commits) keep
    working, which a context of the request's own would forbid.
    """
    token = SyncToAsync.thread_sensitive_context.set(None)  # type: ignore[arg-type]
    try:
        await api(scope, receive, send)
    finally:
        SyncToAsync.thread_sensitive_context.reset(token)
