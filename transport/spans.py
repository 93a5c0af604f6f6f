"""Spans of the WebSocket transport: one per connection, one per inbound frame.

A connection lives for hours, so its frames do not nest under it: each
frame starts a trace of its own (or continues the client's, when an action
carries a `traceparent`) and links back to its connection. Work that
belongs to the connection itself, like the push loop, runs under the
connection's span. While nothing exports, dropped spans are built here
directly, for frames and for HTTP requests (telemetry.middleware).
"""

import contextlib
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import msgspec
from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Tracer

tracer = trace.get_tracer("transport.consumers")

CONNECTION = "WebSocket /ws/transport/"
FRAME = "WebSocket frame"


class _Traced(msgspec.Struct):
    traceparent: str | None = None


_traced = msgspec.json.Decoder(_Traced)


def open_connection(scope: dict[str, Any]) -> tuple[Span, object]:
    """Start a connection's span and make it current for the connection's task."""
    client = scope.get("client") or [None]
    span = tracer.start_span(
        CONNECTION,
        kind=SpanKind.SERVER,
        attributes={"network.peer.address": str(client[0]), "url.path": str(scope.get("path"))},
    )
    return span, context.attach(trace.set_span_in_context(span))


def close_connection(span: Span, token: object, code: int) -> None:
    """End a connection's span, recording the close code."""
    span.set_attribute("websocket.close_code", code)
    span.end()
    with contextlib.suppress(ValueError):
        context.detach(token)  # type: ignore[arg-type]


def _client_context(text: str | None) -> context.Context:
    """Return the client's trace context from a frame's `traceparent`, else a new root."""
    if text and '"traceparent"' in text:
        try:
            traceparent = _traced.decode(text).traceparent
        except (msgspec.DecodeError, UnicodeDecodeError):
            traceparent = None
        if traceparent:
            return propagate.extract({"traceparent": traceparent}, context=context.Context())
    return context.Context()


@contextlib.contextmanager
def frame(connection: Span | None, text: str | None, session_id: str | None) -> Iterator[Span]:
    """Run the handling of one inbound frame in its own span."""
    parent = _client_context(text)
    if drops_all():
        dropped = unsampled(parent)
        token = context.attach(trace.set_span_in_context(dropped, parent))
        try:
            yield dropped
        finally:
            context.detach(token)
        return

    links = [Link(connection.get_span_context())] if connection is not None else []
    with tracer.start_as_current_span(
        FRAME, context=parent, kind=SpanKind.SERVER, links=links
    ) as span:
        if session_id is not None:
            span.set_attribute("transport.session_id", session_id)
        yield span


def drops_all() -> bool:
    """Tell whether the process's sampler drops every span, as it does while nothing exports.

    A sampler says so with a true `drops_all` (telemetry.tracing's does).
    """
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    return bool(getattr(sampler, "drops_all", False))


def unsampled(parent: context.Context) -> Span:
    """Build the span the SDK builds for a dropped one: new ids, or the client's trace.

    The SDK gets there through the sampler, span limits and links, which
    cost more than the rest of a frame's telemetry; the result is the same
    NonRecordingSpan, so log lines still get a trace id of their own.
    """
    known = trace.get_current_span(parent).get_span_context()
    trace_id = known.trace_id if known.is_valid else _random_id(128)
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=trace_id,
            span_id=_random_id(64),
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
            trace_state=known.trace_state,
        )
    )


def _random_id(bits: int) -> int:
    # Zero is the invalid id of the W3C format.
    while True:
        found = random.getrandbits(bits)
        if found:
            return found


def in_connection(span: Span | None) -> Any:
    """Return a block in which the connection's span is current again."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False)


def child(
    tracer: Tracer, name: str, parent: context.Context | None = None
) -> AbstractContextManager[Span]:
    """Start a span under the current one (or `parent`), unless it would be dropped.

    Samplers decide a child of an unsampled span as they decided its parent
    (by the parent's flag, or by the trace id they share), and building a
    span only to drop it costs more than the rest of an echo action's
    routing. The current span stands in: log lines keep its trace id, and
    attributes set on it are ignored as on any dropped span.
    """
    if parent is None:
        # The flag, not is_recording(): the frame's span has ended by the
        # time an action it started reaches the worker.
        current = trace.get_current_span()
        known = current.get_span_context()
        if known.is_valid and not known.trace_flags.sampled:
            return contextlib.nullcontext(current)
    return tracer.start_as_current_span(name, context=parent)
