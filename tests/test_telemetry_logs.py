"""The real log output of a server process: JSON lines with the plan's fields.

A server runs with its stdout captured to a file; a WebSocket client, a
REST client, an overflowing mailbox and a rate limit make it log each kind
of line. Then every line must parse, carry its fields, and leak nothing.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from telemetry.middleware import RequestLogging
from tests.helpers import Server, migrated_sqlite
from tests.services import TEST_APPS
from tests.telemetry_clients import exchange, http, open_ws

pytestmark = pytest.mark.process

MARKER = "payload-marker-7f3a"


async def _traffic(server: Server) -> list[str]:
    """Drive one of each logged event; return every token the server handed out."""
    ws = await open_ws(server)
    welcome = await exchange(ws, {"type": "hello"})
    await exchange(ws, {"type": "action", "id": "a1", "action": "echo", "payload": {"m": MARKER}})
    await ws.close()

    status, session = http(server, "POST", "/transport/sessions")
    assert status == 201
    token = session["token"]
    assert http(server, "GET", "/transport/poll?timeout=0", token=token)[0] == 200
    await _abandoned_poll(server, token)
    # Capacity 1: the second message overflows the first (a warning).
    for n in range(2):
        body = {"to": session["session_id"], "message_type": "note", "payload": {"m": MARKER}}
        action = {"id": f"d{n}", "action": "test.deliver", "payload": body}
        assert http(server, "POST", "/transport/actions", action, token=token)[0] == 200
    # rest=6/m: the seventh request of this minute is refused (a warning).
    statuses = [http(server, "GET", "/transport/mailbox", token=token)[0] for _ in range(4)]
    assert 429 in statuses
    return [welcome["token"], token]


async def _abandoned_poll(server: Server, token: str) -> None:
    """Park a poll, then close its connection: a tab closed while it waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /transport/poll?timeout=20 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(1.0)
    writer.close()
    await writer.wait_closed()


def _run(tmp_path: Path, level: str) -> tuple[list[dict[str, Any]], str, list[str]]:
    log = tmp_path / f"server-{level}.log"
    env = {
        **migrated_sqlite(tmp_path / f"{level}.sqlite3"),
        **TEST_APPS,
        "SERVER_LOG": str(log),
        "LOG_LEVEL": level,
        "TRANSPORT_MAILBOX_CAPACITY": "1",
    }
    server = Server(env)
    server.env["TRANSPORT_RATE_LIMITS"] = "rest=6/m"
    server.start()
    try:
        tokens = asyncio.run(_traffic(server))
    finally:
        server.stop()
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    return lines, text, tokens


def test_every_line_is_json_with_the_plans_fields_and_no_secret(tmp_path):
    lines, text, tokens = _run(tmp_path, "INFO")

    assert lines
    for line in lines:
        assert {"event", "level", "timestamp", "logger"} <= set(line), line
        assert line["level"] != "debug"
    for token in tokens:
        assert token not in text
    assert MARKER not in text

    events = {line["event"]: line for line in lines}
    connected = [e for e in lines if e["event"] == "session connected"]
    assert {e["transport"] for e in connected} >= {"ws", "rest"}
    assert all(e["level"] == "info" and e["session_id"] and e["trace_id"] for e in connected)
    assert events["session disconnected"]["level"] == "info"
    dropped = events["messages dropped"]
    assert dropped["level"] == "warning"
    assert (dropped["reason"], dropped["message_type"]) == ("overflow", "note")
    assert dropped["session_id"] and dropped["trace_id"]
    limited = events["rate limited"]
    assert limited["level"] == "warning" and limited["transport"] == "rest"
    assert limited["network"] == "127.0.0.0/24"
    # django-structlog's request lines carry the request's trace id as request id.
    requests = [e for e in lines if e["event"] == "request_finished"]
    assert requests and all(e["request_id"] == e["trace_id"] for e in requests)
    # Lines logged within a session's request carry its session and transport.
    polls = [e for e in requests if e["request"].startswith("GET /transport/poll")]
    assert polls and polls[0]["session_id"] and polls[0]["transport"] == "rest"
    # A poll whose client left says so, in its own request's context.
    cancelled = events["request_cancelled"]
    assert cancelled["level"] == "warning" and cancelled["session_id"] == polls[0]["session_id"]


def test_payload_traces_appear_only_at_debug(tmp_path):
    lines, text, tokens = _run(tmp_path, "DEBUG")

    traced = [e for e in lines if MARKER in json.dumps(e)]
    assert traced
    assert {e["level"] for e in traced} == {"debug"}
    received = [e for e in traced if e["event"] == "action received"]
    assert received and received[0]["session_id"] and received[0]["transport"] == "ws"
    for token in tokens:
        assert token not in text


def test_request_lines_name_the_client_the_rate_limits_see(rf, settings):
    # A client's own X-Forwarded-For is not believed; a trusted proxy's is.
    request = rf.get("/transport/poll", REMOTE_ADDR="203.0.113.9")
    request.META["HTTP_X_FORWARDED_FOR"] = "198.51.100.7"
    settings.TRANSPORT_TRUSTED_PROXIES = []
    structlog.contextvars.clear_contextvars()

    RequestLogging.bind_ip(request)
    from_client = structlog.contextvars.get_contextvars()["ip"]
    settings.TRANSPORT_TRUSTED_PROXIES = ["203.0.113.9"]
    RequestLogging.bind_ip(request)
    from_proxy = structlog.contextvars.get_contextvars()["ip"]
    structlog.contextvars.clear_contextvars()

    assert (from_client, from_proxy) == ("203.0.113.9", "198.51.100.7")


def test_tracebacks_of_both_kinds_of_line_land_once_in_one_json_object():
    import io
    import logging

    from telemetry.logs import logging_config

    options = dict(logging_config("INFO")["formatters"]["json"])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(options.pop("()")(**options))
    std = logging.getLogger("tests.lines")
    std.addHandler(handler)
    std.propagate = False
    std.setLevel(logging.INFO)
    try:
        try:
            raise ZeroDivisionError("boom-7f3a")
        except ZeroDivisionError:
            structlog.get_logger("tests.lines").exception("from structlog", token="T-secret")
            std.exception("from logging", extra={"token": "T-secret", "session_id": "s_1"})
    finally:
        std.removeHandler(handler)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["from structlog", "from logging"]
    for line in lines:
        assert line["level"] == "error" and line["logger"] == "tests.lines"
        assert line["exception"].count("ZeroDivisionError: boom-7f3a") == 1
        assert "token" not in line
    assert lines[1]["session_id"] == "s_1"


def test_request_lines_carry_the_trace_id_and_keep_an_upstream_request_id(rf):
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from telemetry.tracing import bind_request_ids

    span = NonRecordingSpan(SpanContext(0xABC, 0xDEF, False, TraceFlags(TraceFlags.SAMPLED)))
    request = rf.get("/transport/poll", HTTP_X_REQUEST_ID="upstream-7")
    structlog.contextvars.clear_contextvars()

    with trace.use_span(span):
        bind_request_ids(sender=None, request=request, logger=None, log_kwargs={})
    bound = structlog.contextvars.get_contextvars()
    structlog.contextvars.clear_contextvars()

    trace_id = format(0xABC, "032x")
    assert bound == {"request_id": trace_id, "trace_id": trace_id, "correlation_id": "upstream-7"}
