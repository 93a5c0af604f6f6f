"""Span export over OTLP/HTTP from a real server process, with the collector up or down."""

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import Server, free_port, migrated_sqlite
from tests.telemetry_clients import http

pytestmark = pytest.mark.process

# Export runs in the background every 100 ms here; generous for a loaded machine.
EXPORT_BOUND = 20.0


class Collector(BaseHTTPRequestHandler):
    """Accept OTLP/HTTP exports and remember their paths and sizes."""

    received: list[tuple[str, int]] = []

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(size)
        Collector.received.append((self.path, size))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _serve_and_echo(tmp_path: Path, endpoint: str) -> Server:
    env = {
        **migrated_sqlite(tmp_path / "db.sqlite3"),
        "SERVER_LOG": str(tmp_path / "server.log"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    server = Server(env).start()
    status, session = http(server, "POST", "/transport/sessions")
    assert status == 201
    action = {"id": "a1", "action": "echo", "payload": {}}
    assert http(server, "POST", "/transport/actions", action, token=session["token"])[0] == 200
    return server


def test_spans_are_exported_to_the_configured_endpoint(tmp_path, collector):
    server = _serve_and_echo(tmp_path, collector)
    try:
        deadline = time.monotonic() + EXPORT_BOUND
        while not Collector.received and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()

    assert Collector.received
    assert {path for path, _ in Collector.received} == {"/v1/traces"}


def test_a_collector_that_is_down_costs_no_request(tmp_path):
    server = _serve_and_echo(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        started = time.perf_counter()
        for _ in range(5):
            assert http(server, "GET", "/healthz")[0] == 200
        # Export failures happen on the exporter's thread, not in requests.
        assert time.perf_counter() - started < 5.0
    finally:
        server.stop()
