"""The objectives, checked by Prometheus's own tools and by a real Prometheus.

promtool checks the rules file and runs its unit tests (each alert on both
sides of its threshold). End to end, a real `prometheus` scrapes a real
server every second while the test drives traffic of known counts, then the
recording rules, the pending alerts and every query of the Grafana
dashboard are read back through Prometheus's HTTP API.
"""

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.sync.client import ClientConnection, connect

from telemetry.metrics import LATENCY_MS_BUCKETS
from tests.helpers import ROOT, Server, free_port, migrated_sqlite
from tests.services import TEST_APPS, require_binary

RULES_DIR = ROOT / "telemetry" / "prometheus"
RULES = RULES_DIR / "rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "transport.json"

# Every metric family of the telemetry contract, as Prometheus names its series.
CONTRACT_SERIES = {
    "transport_session_active_total",
    "transport_mailbox_messages_queued",
    "transport_mailbox_messages_queued_high_water_bucket",
    "transport_mailbox_enqueue_total",
    "transport_mailbox_delivery_total",
    "transport_mailbox_drop_total",
    "transport_inbound_actions_total",
    "transport_outbound_payload_bytes_bucket",
    "transport_dispatch_latency_ms_bucket",
    "transport_poll_duration_ms_bucket",
    "transport_poll_duration_ms_count",
    "transport_rate_limit_trigger_total",
    "transport_mailbox_capacity_sessions",
}

# Grafana's own variables, as it would expand them before querying.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h"}

# Start-up and settling bounds for a loaded 2-core machine; each usually
# takes a second or two.
START_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0


def promtool() -> str:
    return require_binary("promtool", "prometheus")


def load_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str]]:
    """Return (panel title, query) for every query of the dashboard, annotations too."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    queries += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def expand(query: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    return query


def github_anchor(heading: str) -> str:
    """Return the anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --- promtool -----------------------------------------------------------------


def test_the_rules_file_passes_promtool_check():
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_in_the_promtool_unit_tests():
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        cwd=RULES_DIR / "tests",
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    # promtool runs the unit tests; this makes sure none of the alerts is
    # left out of them, on either side of its threshold.
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])

    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set()
    assert names - quiet == set()


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_runbook_section():
    headings = [
        line.lstrip("#").strip() for line in RUNBOOKS.read_text().splitlines() if line[:3] == "## "
    ]
    anchors = {github_anchor(heading) for heading in headings}

    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smhd]", rule.get("for", "")), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/runbooks.md", name
        assert anchor in anchors, f"{name}: no section #{anchor} in docs/runbooks.md"


def test_the_dashboard_reads_only_the_contract_metrics_and_the_recording_rules():
    recorded = {rule["record"] for rule in load_rules() if "record" in rule}
    known = CONTRACT_SERIES | recorded | {"ALERTS"}
    # Series names; `transport` alone is the label of that name.
    names = re.compile(r"\b(?:transport[a-z0-9_:]+|ALERTS)\b")

    for title, query in dashboard_queries():
        used = set(names.findall(query))
        assert used, f"{title}: {query}"
        assert used <= known, f"{title}: unknown series {used - known}"


def test_the_dashboard_draws_each_objective_as_a_threshold():
    dashboard = json.loads(DASHBOARD.read_text())
    drawn = {}
    for panel in dashboard["panels"]:
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off") == "off":
            continue
        steps = defaults["thresholds"]["steps"]
        drawn[panel["title"]] = [step["value"] for step in steps if step["value"] is not None]

    assert drawn["Dispatch latency percentiles"] == [150]
    assert drawn["Poll success"] == [0.99]
    assert drawn["Drops per delivery (1h)"] == [0.001]
    assert drawn["Mailbox sessions against capacity"] == [1]
    assert drawn["Rate-limit hits"] == [0.1]


# --- a real Prometheus -------------------------------------------------------------


class Prometheus:
    """A `prometheus` on a loopback port, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.binary = require_binary("prometheus", "prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "transport", "static_configs": [{"targets": [target]}]}
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        args = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with (self.workdir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, "prometheus", START_TIMEOUT)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.workdir / "prometheus.log").read_text()[-2000:]
            raise RuntimeError(f"prometheus exited: {log}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query; return its vector, failing on any error."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str, label: str) -> dict[str, float]:
        """Return the instant values of `expr` by one of its labels."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def wait_for(ready: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready within {timeout} s")


def rest(
    server: Server, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    """Make one REST call; return the status and the decoded body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.url}{path}", data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    return status, json.loads(raw) if raw else None


def ws_action(
    ws: ClientConnection, action_id: str, action: str, payload: Any, pushed: list[Any]
) -> float:
    """Send one action and wait for its reply; return the round trip in ms.

    Messages pushed meanwhile are appended to `pushed`.
    """
    started = time.perf_counter()
    ws.send(json.dumps({"type": "action", "id": action_id, "action": action, "payload": payload}))
    while True:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == "message":
            pushed.append(frame)
        elif frame["type"] == "reply" and frame["id"] == action_id:
            assert frame["ok"], frame
            return (time.perf_counter() - started) * 1000


# What the end-to-end traffic does, counted by hand.
WS_ECHOES = 10
REST_ECHOES = 2
REST_REQUESTS = 10  # three sessions, three polls, one mailbox read, two actions, one ack
MAILBOX_CAPACITY = 3
OFFLINE_MESSAGES = MAILBOX_CAPACITY + 1  # one overflow
SESSIONS_CAPACITY = 1
# Whom the test.deliver actions deliver to: the never-read session one past
# its capacity, the poller two messages, the WebSocket itself two.
DELIVERIES = ["offline"] * OFFLINE_MESSAGES + ["poller"] * 2 + ["live"] * 2
WS_ACTIONS = WS_ECHOES + len(DELIVERIES)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Server, Prometheus]]:
    """Start a server on a migrated SQLite file and a Prometheus scraping it."""
    env = {
        **migrated_sqlite(tmp_path / "db.sqlite3"),
        **TEST_APPS,
        "SERVER_LOG": str(tmp_path / "server.log"),
        # Exactly REST_REQUESTS pass; the one after them is the test's rate-limit hit.
        "TRANSPORT_RATE_LIMITS": f"ws=10000/h,rest={REST_REQUESTS}/h",
        "TRANSPORT_MAILBOX_CAPACITY": str(MAILBOX_CAPACITY),
        "TRANSPORT_MAILBOX_SESSIONS_CAPACITY": str(SESSIONS_CAPACITY),
        # Keep the polling session on `rest` however slow the machine is.
        "TRANSPORT_REST_IDLE": "600",
    }
    server = Server(env)
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        server.start()
        prometheus.start()
        yield server, prometheus
    finally:
        prometheus.stop()
        server.kill()


@pytest.mark.process
def test_prometheus_records_what_the_traffic_did(stack):
    server, prometheus = stack

    # Every series exists at zero from startup: wait until Prometheus holds a
    # sample of them from before any traffic, so rates count all of it.
    wait_for(
        lambda: len(prometheus.query("transport_poll_duration_ms_count")) == 3,
        "first scrape",
        START_TIMEOUT,
    )

    # Sessions: `offline` and `spare` are never read (the `mailbox`
    # transport), `poller` long-polls (`rest`), `live` holds a WebSocket.
    _, offline = rest(server, "POST", "/transport/sessions")
    assert rest(server, "POST", "/transport/sessions")[0] == 201  # `spare`
    _, poller = rest(server, "POST", "/transport/sessions")
    with connect(server.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "hello"}))
        live = json.loads(ws.recv(timeout=10))
        assert live["type"] == "welcome"

        # Actions over the WebSocket: echoes, and deliveries through an
        # action handler: four to a mailbox of capacity three (one overflow),
        # two to the poller, two to the WebSocket itself.
        pushed: list[Any] = []
        rtts = [ws_action(ws, f"e{n}", "echo", {"n": n}, pushed) for n in range(WS_ECHOES)]
        for n, target in enumerate(DELIVERIES):
            to = {"offline": offline, "poller": poller, "live": live}[target]["session_id"]
            payload = {"to": to, "message_type": "t", "payload": {"n": n}}
            rtts.append(ws_action(ws, f"d{n}", "test.deliver", payload, pushed))
        while len(pushed) < DELIVERIES.count("live"):
            frame = json.loads(ws.recv(timeout=10))
            if frame["type"] == "message":
                pushed.append(frame)

        # Over REST: one poll answers two messages, two find nothing; the
        # pull-only read returns the three messages left after the overflow.
        token = poller["token"]
        polled = [
            rest(server, "GET", f"/transport/poll?after={after}&timeout=0", token)
            for after in (0, 2, 2)
        ]
        assert [len(body["messages"]) for _, body in polled] == [2, 0, 0]
        status, read = rest(server, "GET", "/transport/mailbox?after=0", offline["token"])
        assert len(read["messages"]) == MAILBOX_CAPACITY
        for n in range(REST_ECHOES):
            status, reply = rest(
                server, "POST", "/transport/actions", token, {"id": n, "action": "echo"}
            )
            assert status == 200 and reply["ok"], reply
        assert rest(server, "POST", "/transport/ack", token, {"seq": 2})[0] == 204

        # One request past the limit: the only rate-limit hit.
        assert rest(server, "POST", "/transport/sessions")[0] == 429

        check_recording_rules(prometheus, max(rtts))
        check_pending_alerts(prometheus)
        check_dashboard_queries(prometheus)


def check_recording_rules(prometheus: Prometheus, slowest_ws_ms: float) -> None:
    """Compare the recorded indicators with the traffic of the test."""
    # Every counter was scraped at zero first and all are scraped together,
    # so rate() extrapolates each by the same factor: increases divided by
    # that factor are exact counts. The factor is read off the deliveries.
    deliveries = {"ws": 2, "rest": 2, "mailbox": MAILBOX_CAPACITY}
    expected = {
        "transport:mailbox_deliveries:rate5m": ("transport", deliveries),
        "transport:mailbox_enqueues:rate5m": ("source", {"router": len(DELIVERIES), "system": 0}),
        "transport:mailbox_drops:rate5m": (
            "reason",
            {"overflow": 1, "ttl": 0, "transport-closed": 0},
        ),
        "transport:inbound_actions:rate5m": ("transport", {"ws": WS_ACTIONS, "rest": REST_ECHOES}),
        "transport:poll_requests:rate5m": ("outcome", {"messages": 1, "timeout": 2, "error": 0}),
        "transport:rate_limit_triggers:rate5m": ("transport", {"ws": 0, "rest": 1}),
    }

    def counts() -> dict[str, dict[str, float]]:
        factor = sum(
            prometheus.values("transport:mailbox_deliveries:rate5m", "transport").values()
        )
        factor = factor * 300 / sum(deliveries.values())
        found = {}
        for rule, (label, _) in expected.items():
            values = prometheus.values(rule, label)
            found[rule] = {
                k: round(v * 300 / factor, 6) if factor else v for k, v in values.items()
            }
        found["factor"] = {"": factor}
        return found

    wanted = {rule: {k: float(v) for k, v in by.items()} for rule, (_, by) in expected.items()}
    last: dict[str, dict[str, float]] = {}

    def settled() -> bool:
        nonlocal last
        last = counts()
        return all(last[rule] == wanted[rule] for rule in wanted)

    try:
        wait_for(settled, "recording rules", SETTLE_TIMEOUT)
    except AssertionError:
        assert last == wanted  # shows the difference
    # rate() only ever adds to an increase that starts at zero: it stretches
    # it to the window's end, by at most 1.1 scrape intervals, and at least
    # two scrapes lie in the window.
    assert 1 <= last["factor"][""] <= 2.1

    ratio = prometheus.values("transport:mailbox_drops:ratio_rate5m", "")
    assert ratio[""] == pytest.approx(1 / sum(deliveries.values()))
    assert prometheus.values("transport:mailbox_drops:ratio_rate1h", "")[""] == pytest.approx(
        ratio[""]
    )
    assert prometheus.values("transport:poll_success:ratio_rate5m", "") == {"": 1.0}
    assert prometheus.values("transport:poll_errors:ratio_rate1h", "") == {"": 0.0}

    # The server's receive-to-reply time is within the client's round trip,
    # so p99 lies at or below the first bucket edge above the slowest one.
    edge = next((b for b in LATENCY_MS_BUCKETS if b >= slowest_ws_ms), LATENCY_MS_BUCKETS[-1])
    p99 = prometheus.values("transport:dispatch_latency_ms:p99_rate5m", "transport")
    assert 0 < p99["ws"] <= edge
    assert 0 < p99["rest"] <= LATENCY_MS_BUCKETS[-1]

    # Two sessions never read, against a capacity of one; the baseline of a
    # transport without a day of history is zero.
    capacity = prometheus.values("transport:mailbox_sessions:capacity_ratio", "job")
    assert capacity == {"transport": 2.0}
    baseline = prometheus.values("transport:rate_limit_triggers:baseline_rate1d", "transport")
    assert baseline == {"ws": 0.0, "rest": 0.0}


def check_pending_alerts(prometheus: Prometheus) -> None:
    """Tell which alerts the traffic makes pending: their `for:` is longer than the test."""
    p99 = prometheus.values('transport:dispatch_latency_ms:p99_rate5m{transport="ws"}', "")
    slow = {"TransportWsDispatchLatencyHigh"} if p99[""] >= 150 else set()
    # One drop in seven deliveries breaks every drop objective; two sessions
    # exceed a capacity of one. No poll failed, and one rate-limit hit is
    # far below the 0.1/s floor of a spike.
    expected = {
        ("TransportMailboxDropsHigh", ""),
        ("TransportMailboxDropBudgetBurn", "1h"),
        ("TransportMailboxDropBudgetBurn", "6h"),
        ("TransportMailboxDropBudgetSlowBurn", "3d"),
        ("TransportMailboxSessionsOverCapacity", ""),
    } | {(name, "") for name in slow}
    found: set[tuple[str, str]] = set()

    def pending() -> bool:
        nonlocal found
        alerts = prometheus.query('ALERTS{alertname=~"Transport.*"}')
        found = {(a["metric"]["alertname"], a["metric"].get("window", "")) for a in alerts}
        return found == expected

    try:
        wait_for(pending, "pending alerts", SETTLE_TIMEOUT)
    except AssertionError:
        assert found == expected
    states = {a["metric"]["alertstate"] for a in prometheus.query("ALERTS")}
    assert states == {"pending"}


def check_dashboard_queries(prometheus: Prometheus) -> None:
    """Send every dashboard query to Prometheus: each parses, each panel shows data."""
    for title, query in dashboard_queries():
        result = prometheus.query(expand(query))
        if title != "Alerts":
            assert result, f"{title}: no data for {query}"
            values = [float(s["value"][1]) for s in result]
            assert not all(math.isnan(v) for v in values), f"{title}: {query}"
