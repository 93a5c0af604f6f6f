"""Serve the REST API through a short middleware chain of its own.

Django runs each hook of a middleware that is not async-capable through a
thread hop. The site's full chain (sessions, CSRF, auth, messages, ...)
cost about 26 hops and most of the CPU of an API request, for nothing the
API uses: it authenticates by bearer token and needs no CSRF check. The
API keeps the middleware that observes it, all async: tracing, request
logging, and Prometheus's request metrics (telemetry.middleware).
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import HttpRequest, HttpResponseBase
from django.http.request import HttpHeaders
from django.urls import set_script_prefix
from django.utils.functional import cached_property

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


class LazyHeaders(HttpHeaders):
    """request.headers that finds a header in META when asked for it.

    Django's builds an entry for every header on first use, about 6 us
    here, and the API and its middleware read two or three. The whole map
    is built only to be listed.
    """

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    @cached_property
    def _store(self) -> dict[str, tuple[str, Any]]:  # type: ignore[override]
        store: dict[str, tuple[str, Any]] = HttpHeaders(self._environ)._store
        return store

    def __getitem__(self, key: str) -> Any:
        name = key.upper().replace("-", "_")
        if name not in self.UNPREFIXED_HEADERS:
            name = "HTTP_" + name
        return self._environ[name]


class APIHandler(ASGIHandler):
    """Django's ASGI handler with the API's middleware chain, closing responses on the loop."""

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

    def create_request(self, scope: Mapping[str, Any], body_file: Any) -> Any:
        request: HttpRequest | None
        request, refusal = super().create_request(scope, body_file)
        if request is not None:
            request.headers = LazyHeaders(request.META)
        return request, refusal

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Serve one request as Django's handler does, but close its response inline.

        Django closes every response through a thread hop, for the sync
        request_finished receivers, which may use the database. Those left
        on the API's path do not (reset_urlconf, close_caches; connection
        upkeep runs with the API's own database calls, transport.connections),
        and the hop cost about as much CPU as the rest of a light request.
        """
        try:
            body = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        try:
            request, response = self.create_request(scope, body)
            if request is None:
                assert response is not None  # Django's refusal: a 400 or a 413
                await self.send_response(response, send)
            else:
                response = await self._respond(request, receive, send)
        finally:
            body.close()

        if response is None:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            response.close()

    async def _respond(self, request: Any, receive: Any, send: Any) -> HttpResponseBase | None:
        """Answer a request, or cancel its view when the client leaves first (None)."""

        async def answer() -> HttpResponseBase:
            response: HttpResponseBase = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):
                # The client left while the response was being sent.
                await self.send_response(response, send)
            return response

        answering = asyncio.create_task(answer())
        # Raises RequestAborted when the client disconnects.
        leaving = asyncio.create_task(self.listen_for_disconnect(receive))
        await asyncio.wait([leaving, answering], return_when=asyncio.FIRST_COMPLETED)
        if not leaving.done():
            leaving.cancel()
        elif not answering.done():
            answering.cancel()
        for task in (leaving, answering):
            with contextlib.suppress(asyncio.CancelledError, RequestAborted):
                await task
        return None if answering.cancelled() else answering.result()


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
