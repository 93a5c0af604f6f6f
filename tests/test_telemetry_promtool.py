"""The /metrics page passes `promtool check metrics`, but for the plan's own names."""

import os
import subprocess

import pytest
from django.test import AsyncClient

from tests.helpers import hello, recv, send
from tests.services import require_binary

pytestmark = pytest.mark.django_db(transaction=True)

# The plan keeps these names although they break Prometheus's naming rules:
# a gauge ending in `_total`, and two histograms in milliseconds. They are
# the only findings accepted; anything else fails the test.
ACCEPTED = {
    ("transport_session_active_total", 'non-counter metrics should not have "_total" suffix'),
    ("transport_dispatch_latency_ms", "metric names should not contain abbreviated units"),
    ("transport_poll_duration_ms", "metric names should not contain abbreviated units"),
}


async def test_metrics_pass_promtool_check_metrics_but_for_the_plans_names(ws):
    promtool = require_binary("promtool", "prometheus")
    # Traffic first, so that every family has samples of every kind.
    client = AsyncClient()
    comm = await ws()
    await hello(comm)
    await send(comm, {"type": "action", "id": "a1", "action": "echo", "payload": {}})
    await recv(comm)
    session = (await client.post("/transport/sessions")).json()
    await client.get(
        "/transport/poll?timeout=0", headers={"Authorization": f"Bearer {session['token']}"}
    )
    page = (await client.get("/metrics")).content

    result = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, timeout=60,
        env={**os.environ, "NO_PROXY": "*"},
    )  # fmt: skip

    findings = set()
    for line in result.stderr.decode().splitlines() + result.stdout.decode().splitlines():
        name, _, problem = line.partition(" ")
        findings.add((name, problem.strip()))
    assert findings - ACCEPTED == set(), result.stderr.decode()
    assert findings == ACCEPTED
