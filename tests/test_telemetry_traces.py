"""Spans of one action, from the transport through the worker to the mailbox.

The process's tracer provider (set up by the telemetry app) gets an
in-memory exporter for the test; spans are read back as exported.
"""

import asyncio
import json
from collections.abc import Iterator

import pytest
from django.test import AsyncClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailbox.api import adeliver, deliver
from telemetry import tracing
from tests.helpers import hello, recv, send
from transport import registry
from transport import spans as frame_spans
from transport.registry import ActionContext, Payload
from transport.spans import child

pytestmark = pytest.mark.django_db(transaction=True)

ROUTER = "Transport.Router.handle_action/3"
WORKER = "Transport.Worker.run_job/1"
DELIVER = "Transport.Mailbox.deliver/2"
FETCH = "Transport.Mailbox.fetch/2"

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


def _notify(ctx: ActionContext, payload: Payload) -> Payload:
    return {"seq": deliver(ctx.session_id, "note", {})}


def _trace_id(ctx: ActionContext, payload: Payload) -> Payload:
    return {"trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x")}


registry.register("traces.notify", _notify)
registry.register("traces.trace_id", _trace_id)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "the telemetry app installs the SDK provider"
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    tracing.add_span_processor(processor)
    yield exporter
    # The provider keeps its processors; a shut-down one exports nothing more.
    processor.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def trace_of(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_websocket_action_is_one_trace_from_frame_to_mailbox(ws, spans):
    comm = await ws()
    await hello(comm)
    spans.clear()

    await send(comm, {"type": "action", "id": "a1", "action": "traces.notify", "payload": {}})
    frames = [await recv(comm), await recv(comm)]

    assert {f["type"] for f in frames} == {"reply", "message"}
    found = by_name(spans)
    router, worker, delivered = found[ROUTER][0], found[WORKER][0], found[DELIVER][0]
    frame = next(s for s in found["WebSocket frame"] if trace_of(s) == trace_of(router))
    assert trace_of(worker) == trace_of(delivered) == trace_of(frame)
    assert parent_of(router) == frame.context.span_id
    assert parent_of(worker) == router.context.span_id
    assert parent_of(delivered) == worker.context.span_id
    # Frames start traces of their own, linked to their connection's span.
    assert frame.parent is None and len(frame.links) == 1


async def test_a_rest_action_is_one_trace_from_the_http_span_to_the_mailbox(spans):
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    spans.clear()

    response = await client.post(
        "/transport/actions",
        data=json.dumps({"id": "r1", "action": "traces.notify", "payload": {}}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {session['token']}"},
    )

    assert response.status_code == 200
    found = by_name(spans)
    http = next(s for s in spans.get_finished_spans() if s.name.startswith("POST"))
    router, worker, delivered = found[ROUTER][0], found[WORKER][0], found[DELIVER][0]
    assert trace_of(http) == trace_of(router) == trace_of(worker) == trace_of(delivered)
    assert parent_of(router) == http.context.span_id


async def test_a_client_traceparent_is_continued_on_both_transports(ws, spans):
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    comm = await ws()
    await hello(comm)
    spans.clear()

    action = {"action": "echo", "payload": {}, "traceparent": CLIENT_PARENT}
    await send(comm, {"type": "action", "id": "a1", **action})
    await recv(comm)
    await client.post(
        "/transport/actions",
        data=json.dumps({"id": "r1", **action}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {session['token']}"},
    )

    routers = by_name(spans)[ROUTER]
    assert len(routers) == 2
    assert {format(trace_of(s), "032x") for s in routers} == {CLIENT_TRACE}
    workers = by_name(spans)[WORKER]
    assert {format(trace_of(s), "032x") for s in workers} == {CLIENT_TRACE}


async def test_an_http_traceparent_header_is_continued(spans):
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    spans.clear()

    await client.get(
        "/transport/mailbox",
        headers={"Authorization": f"Bearer {session['token']}", "traceparent": CLIENT_PARENT},
    )

    fetches = by_name(spans)[FETCH]
    assert [format(trace_of(s), "032x") for s in fetches] == [CLIENT_TRACE]


async def test_a_fetch_is_spanned_with_its_session(spans):
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    spans.clear()

    await client.get(
        "/transport/poll?timeout=0", headers={"Authorization": f"Bearer {session['token']}"}
    )

    fetch = by_name(spans)[FETCH][0]
    assert fetch.attributes is not None
    assert fetch.attributes["transport.session_id"] == session["session_id"]
    http = next(s for s in spans.get_finished_spans() if s.name.startswith("GET"))
    assert trace_of(fetch) == trace_of(http)


async def test_a_websocket_connection_has_a_span_that_ends_with_its_close_code(ws, spans):
    comm = await ws()
    await hello(comm)
    await comm.disconnect(code=1000)

    connection = by_name(spans)["WebSocket /ws/transport/"][-1]
    assert connection.attributes is not None
    assert connection.attributes["websocket.close_code"] == 1000


def _under(flags: int) -> trace.NonRecordingSpan:
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=int(CLIENT_TRACE, 16),
            span_id=0x00F067AA0BA902B7,
            is_remote=False,
            trace_flags=trace.TraceFlags(flags),
        )
    )


def test_a_child_of_an_unsampled_span_is_not_built_and_the_parent_stands_in():
    tracer = TracerProvider().get_tracer("test")
    unsampled, sampled = _under(0), _under(trace.TraceFlags.SAMPLED)

    with trace.use_span(unsampled), child(tracer, ROUTER) as span:
        assert span is unsampled
    with trace.use_span(sampled), child(tracer, ROUTER) as span:
        assert span is not sampled and span.is_recording()
        assert span.get_span_context().trace_id == int(CLIENT_TRACE, 16)
    # An explicit parent (a client's traceparent) always gets its span.
    parent = trace.set_span_in_context(sampled)
    with trace.use_span(unsampled), child(tracer, ROUTER, parent) as span:
        assert span.get_span_context().trace_id == int(CLIENT_TRACE, 16)
        assert span.is_recording()


def test_frames_keep_trace_ids_of_their_own_or_the_clients_while_nothing_exports(monkeypatch):
    monkeypatch.setattr(tracing._sampler, "exporting", False)
    assert frame_spans.drops_all()
    traced = json.dumps({"type": "action", "id": 1, "traceparent": CLIENT_PARENT})

    with frame_spans.frame(None, traced, "s_x") as continued:
        assert trace.get_current_span() is continued
    with frame_spans.frame(None, '{"type": "ping"}', None) as first:
        pass
    with frame_spans.frame(None, '{"type": "ping"}', None) as second:
        pass

    assert continued.get_span_context().trace_id == int(CLIENT_TRACE, 16)
    ids = {s.get_span_context().trace_id for s in (continued, first, second)}
    assert len(ids) == 3 and all(s.get_span_context().is_valid for s in (first, second))
    assert not any(s.is_recording() for s in (continued, first, second))
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_http_requests_keep_trace_ids_of_their_own_or_the_clients_while_nothing_exports(
    monkeypatch,
):
    monkeypatch.setattr(tracing._sampler, "exporting", False)
    client = AsyncClient()
    session = (await client.post("/transport/sessions")).json()
    bearer = f"Bearer {session['token']}"

    async def trace_id(n: int, **headers: str) -> str:
        action = {"id": n, "action": "traces.trace_id", "payload": {}}
        response = await client.post(
            "/transport/actions", action, "application/json", headers=headers
        )
        return str(response.json()["payload"]["trace_id"])

    continued = await trace_id(1, Authorization=bearer, traceparent=CLIENT_PARENT)
    first = await trace_id(2, Authorization=bearer)
    second = await trace_id(3, Authorization=bearer)

    assert continued == CLIENT_TRACE
    assert len({continued, first, second}) == 3 and "0" * 32 not in (first, second)


async def test_deliveries_queued_together_are_spanned_under_their_own_callers(spans):
    session = (await AsyncClient().post("/transport/sessions")).json()
    tracer = trace.get_tracer("test")

    async def deliver_under(name: str) -> int:
        with tracer.start_as_current_span(name) as span:
            await adeliver(session["session_id"], "note", {})
            return span.get_span_context().span_id

    callers = set(await asyncio.gather(*(deliver_under(f"caller {n}") for n in range(3))))

    delivers = by_name(spans)[DELIVER]
    assert len(delivers) == 3 and {parent_of(s) for s in delivers} == callers
