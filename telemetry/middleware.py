"""Observing middleware made async: tracing and request metrics without thread hops.

opentelemetry-instrumentation-django's middleware declares itself
sync-only, and Django then runs every later
middleware and the view through async_to_sync on the one thread of
thread-sensitive code: a parked long-poll would hold that thread for its
whole wait, and all sync work of the process would queue behind it. Its
hooks only read the request and start or end a span, so here they run
inline on the event loop, in the request task's own context, where the
span is attached and later detached.
"""

import asyncio
from typing import Any, ClassVar

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse
from django_prometheus.middleware import PrometheusAfterMiddleware, PrometheusBeforeMiddleware
from django_structlog.app_settings import app_settings as structlog_settings
from django_structlog.middlewares import RequestMiddleware
from django_structlog.middlewares.request import logger as request_logger
from opentelemetry import context, propagate, trace
from opentelemetry.instrumentation.django.middleware.otel_middleware import _DjangoMiddleware

from transport import clients, spans

# nginx's status for a request whose client closed the connection first.
CLIENT_CLOSED_REQUEST = 499


class TracingMiddleware(_DjangoMiddleware):
    """Span each HTTP request, under ASGI without leaving the event loop."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        # Decided once: asking iscoroutinefunction() of an instance on every
        # request walks several attribute lookups.
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        if spans.drops_all():
            return await self._unrecorded(request)
        response: Any = self.process_request(request)
        try:
            if response is None:
                response = await self.get_response(request)
        except asyncio.CancelledError as exc:
            # The client went away (a long-poll it gave up on): end the span
            # now, in the context that attached it. Left to the garbage
            # collector, its detach fails and logs an error for a normal event.
            self.process_exception(request, exc)
            self.process_response(request, HttpResponse(status=CLIENT_CLOSED_REQUEST))
            raise
        result: HttpResponse = self.process_response(request, response)
        return result

    async def process_view(
        self, request: HttpRequest, view_func: Any, *args: Any, **kwargs: Any
    ) -> None:
        """Name a recorded request's span by its route, on the loop: a sync hook costs a hop."""
        if self._environ_span_key in request.META:
            super().process_view(request, view_func, *args, **kwargs)

    async def _unrecorded(self, request: HttpRequest) -> HttpResponse:
        """Serve a request under a dropped span built directly, while nothing exports.

        The instrumentation builds a dozen attributes for the sampler before
        it drops the span, about a sixth of a request's CPU. The dropped
        span still carries the ids log lines need: the client's trace when
        it sent a traceparent, else a new one.
        """
        parent = context.Context()
        if "HTTP_TRACEPARENT" in request.META:
            parent = propagate.extract(request.headers, context=parent)
        dropped = spans.unsampled(parent)
        token = context.attach(trace.set_span_in_context(dropped, parent))
        try:
            inner: Any = self.get_response  # async: this chain is built for an async handler
            response: HttpResponse = await inner(request)
            return response
        finally:
            context.detach(token)


class _OnTheLoop:
    """Run a MiddlewareMixin's hooks inline on the event loop.

    For middleware whose hooks only count or label: Django would otherwise
    run each hook through a thread hop, several per request.
    """

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        hooks: Any = self  # a MiddlewareMixin, by the classes this is mixed into
        response: Any = hooks.process_request(request)
        if response is None:
            response = await hooks.get_response(request)
        result: HttpResponse = hooks.process_response(request, response)
        return result


class _KnownSeries:
    """Look each labelled series up once, not on every request.

    prometheus_client's labels() checks and converts the values and takes
    the metric's lock every time; django-prometheus calls it about seven
    times a request. Its labels (method, status, view, ...) take few values.
    """

    # Shared by both middleware: the metric is part of the key.
    _series: ClassVar[dict[tuple[Any, ...], Any]] = {}

    def label_metric(self, metric: Any, request: Any, response: Any = None, **labels: Any) -> Any:
        if not labels:
            return metric
        key = (metric, *labels.items())
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(**labels)
        return series


class PrometheusBefore(_OnTheLoop, _KnownSeries, PrometheusBeforeMiddleware):
    """django-prometheus's outer request metrics, without thread hops."""


class PrometheusAfter(_OnTheLoop, _KnownSeries, PrometheusAfterMiddleware):
    """django-prometheus's inner request metrics, without thread hops."""

    async def process_view(
        self, request: HttpRequest, view_func: Any, *args: Any, **kwargs: Any
    ) -> None:
        super().process_view(request, view_func, *args, **kwargs)

    async def process_template_response(
        self, request: HttpRequest, response: HttpResponse
    ) -> HttpResponse:
        result: HttpResponse = super().process_template_response(request, response)
        return result


class RequestLogging(RequestMiddleware):
    """django-structlog's request lines, with the client address the rate limits use.

    Its own address comes from django-ipware, which believes X-Forwarded-For
    from any client unless told which proxies to trust, and costs more than
    the rest of the line. The transport's believes only the proxies of
    TRANSPORT_TRUSTED_PROXIES.
    """

    @classmethod
    def bind_ip(cls, request: HttpRequest) -> None:
        structlog.contextvars.bind_contextvars(ip=clients.of_request(request))


class APIRequestLogging(RequestLogging):
    """The request lines of the API, logged on the event loop.

    django-structlog's async path runs each of its two hooks through a
    thread hop, to read request.user safely. The API has no request.user
    (it has no authentication middleware), so nothing in them can touch
    the database.
    """

    def __call__(self, request: HttpRequest) -> Any:
        # The API's chain is built for an async handler only; django-structlog
        # asks iscoroutinefunction(self) on every request to find that out.
        return self.__acall__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        self.prepare(request)
        inner: Any = self.get_response  # async: this chain is built for an async handler
        try:
            response: HttpResponse = await inner(request)
        except asyncio.CancelledError:
            request_logger.log(structlog_settings.REQUEST_CANCELLED_LOG_LEVEL, "request_cancelled")
            raise
        self.handle_response(request, response)
        return response
