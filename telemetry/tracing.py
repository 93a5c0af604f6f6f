"""OpenTelemetry: the tracer provider, HTTP spans, and log lines joined to traces.

Configured from OpenTelemetry's own variables: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES name the service, OTEL_TRACES_SAMPLER samples,
OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) turns on the OTLP/HTTP
exporter, OTEL_SDK_DISABLED=true turns everything off. Without an endpoint
spans are still made, so trace ids reach the logs and the worker, but
nothing is exported.

Spans are exported from a background thread in batches: a collector that is
down costs a warning in the logs and the dropped spans, never a request.
"""

import os
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

DEFAULT_SERVICE_NAME = "transport"

_configured = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _endpoint() -> str:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def setup() -> None:
    """Install the tracer provider and the Django instrumentation, once per process."""
    global _configured
    if _configured or _flag("OTEL_SDK_DISABLED"):
        return
    _configured = True

    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    if _endpoint() and "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

    # Adds its middleware at the head of MIDDLEWARE, so the HTTP span is
    # current before django-structlog binds the request id.
    _Instrumentor().instrument()


class _Instrumentor(DjangoInstrumentor):
    """The Django instrumentation, with its middleware made async-capable."""

    _opentelemetry_middleware = "telemetry.middleware.TracingMiddleware"


def bind_request_ids(sender: Any, request: Any, logger: Any, log_kwargs: Any, **kw: Any) -> None:
    """Make django-structlog's request id the request's trace id.

    One id then finds a request's log lines and its trace. An upstream
    X-Request-ID is kept as `correlation_id`.
    """
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return
    trace_id = format(context.trace_id, "032x")
    upstream = request.headers.get("X-Request-ID")
    if upstream and upstream != trace_id:
        structlog.contextvars.bind_contextvars(correlation_id=upstream)
    structlog.contextvars.bind_contextvars(request_id=trace_id, trace_id=trace_id)
