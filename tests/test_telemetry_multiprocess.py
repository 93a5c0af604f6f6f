"""Metrics across processes: two servers and the cron command share one directory.

Each process writes its counters and histograms to prometheus_client's
multiprocess files; either server's /metrics sums them all, and the gauges,
read from the shared database, are counted once.
"""

import time
from pathlib import Path

import pytest

from tests.helpers import Server, manage, migrated_sqlite
from tests.services import TEST_APPS
from tests.telemetry_clients import http, scrape

pytestmark = pytest.mark.process


def echo(server: Server, token: str, n: int) -> None:
    for i in range(n):
        action = {"id": f"e{i}", "action": "echo", "payload": {}}
        assert http(server, "POST", "/transport/actions", action, token=token)[0] == 200


def test_counters_of_every_process_add_up_and_gauges_count_once(tmp_path: Path):
    prom = tmp_path / "prometheus"
    env = {
        **migrated_sqlite(tmp_path / "db.sqlite3"),
        **TEST_APPS,
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    # A previous deployment left a file behind: a process long gone.
    leftover = "from telemetry import metrics; metrics.mailbox_drop.labels('overflow').inc(1000)"
    stale = manage("shell", "-c", leftover, env=env)
    assert stale.returncode == 0, stale.stderr
    assert list(prom.glob("counter_*.db"))

    servers = [Server({**env, "SERVER_LOG": str(tmp_path / f"s{i}.log")}) for i in range(3)]
    a, b, c = servers
    try:
        a.start()
        b.start()
        sessions = [http(s, "POST", "/transport/sessions")[1] for s in (a, b, a)]
        echo(a, sessions[0]["token"], 3)
        echo(b, sessions[1]["token"], 2)

        # The cron side: messages queued from a shell, expired by the command.
        queued = manage(
            "shell", "-c",
            "from mailbox.api import deliver\n"
            f"for n in range(4): deliver({sessions[2]['session_id']!r}, 'news', {{}}, ttl=1)",
            env=env,
        )  # fmt: skip
        assert queued.returncode == 0, queued.stderr
        time.sleep(1.5)
        expired = manage("expire_mailboxes", env=env)
        assert expired.returncode == 0, expired.stderr

        for server in (a, b):
            page = scrape(server)
            assert (
                page.value("transport_inbound_actions_total", transport="rest", action="echo") == 5
            )
            assert (
                page.value("transport_dispatch_latency_ms_count", transport="rest", action="echo")
                == 5
            )
            assert page.value("transport_mailbox_enqueue_total", source="system") == 4
            assert page.value("transport_mailbox_drop_total", reason="ttl") == 4
            assert page.value("transport_mailbox_messages_queued_high_water_count") == 1
            # The first server cleared the stale file; nothing else overflowed.
            assert page.value("transport_mailbox_drop_total", reason="overflow") == 0
            # Three sessions, each counted once however many processes serve it.
            name = "transport_session_active_total"
            assert [page.value(name, transport=t) for t in ("ws", "rest", "mailbox")] == [0, 0, 3]
            assert page.series(name) == [{"transport": t} for t in ("ws", "rest", "mailbox")]
            assert page.value("transport_mailbox_messages_queued", mailbox="_total") == 0
            assert page.value("transport_mailbox_capacity_sessions") == 100000

        # A server killed and another started beside a live one: the totals
        # keep the dead server's counts, and the new server clears nothing.
        b.kill()
        c.start()
        page = scrape(c)
        assert page.value("transport_inbound_actions_total", transport="rest", action="echo") == 5
        assert page.value("transport_mailbox_drop_total", reason="ttl") == 4
    finally:
        for server in servers:
            server.kill()
