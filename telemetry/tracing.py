"""OpenTelemetry: the tracer provider, HTTP spans, and log lines joined to traces.

Configured from OpenTelemetry's own variables: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES name the service, OTEL_TRACES_SAMPLER samples,
OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) turns on the OTLP/HTTP
exporter, OTEL_SDK_DISABLED=true turns everything off. Without an endpoint
spans are dropped as they start (SampleWhenExported), but their trace ids
still reach the logs and the worker.

Spans are exported from a background thread in batches: a collector that is
down costs a warning in the logs and the dropped spans, never a request.
"""

import os
from collections.abc import Sequence
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

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
    # An explicit OTEL_TRACES_SAMPLER is the operator's choice; otherwise
    # spans are recorded only while something exports them.
    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else _sampler
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    if _endpoint() and "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        add_span_processor(BatchSpanProcessor(OTLPSpanExporter()), provider)
    trace.set_tracer_provider(provider)

    # Adds its middleware at the head of MIDDLEWARE, so the HTTP span is
    # current before django-structlog binds the request id.
    _Instrumentor().instrument()


class SampleWhenExported(Sampler):
    """Record spans only once a span processor exports them.

    Without an exporter, a recorded span is built, filled and thrown away:
    on the WebSocket echo path that was a third of the server's CPU. A
    dropped span still gets a valid trace id, so logs and the worker keep
    their trace ids and a client's `traceparent` is still continued.
    """

    def __init__(self) -> None:
        self.exporting = False
        self.inner = ParentBased(ALWAYS_ON)

    @property
    def drops_all(self) -> bool:
        """True while nothing exports: dropped spans are then built directly (transport.spans)."""
        return not self.exporting

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.exporting:
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state)

    def get_description(self) -> str:
        return "SampleWhenExported"


_sampler = SampleWhenExported()


def add_span_processor(processor: SpanProcessor, provider: TracerProvider | None = None) -> None:
    """Export spans through `processor` from now on (tests add an in-memory one)."""
    target = provider or trace.get_tracer_provider()
    assert isinstance(target, TracerProvider), target
    target.add_span_processor(processor)
    _sampler.exporting = True


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
