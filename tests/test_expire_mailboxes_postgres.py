"""`manage.py expire_mailboxes` on a real PostgreSQL: SKIP LOCKED under concurrency."""

import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.services import PostgresCluster
from tests.test_expire_mailboxes import counts, start

pytestmark = pytest.mark.process

_names = itertools.count()


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[PostgresCluster, str]]:
    """Start one cluster for the module, with a migrated template database."""
    cluster = PostgresCluster().start()
    try:
        yield cluster, cluster.migrated_template()
    finally:
        cluster.destroy()


def seeded(postgres: tuple[PostgresCluster, str], boxes: int, ended: int, per_box: int) -> str:
    """Copy the template and fill it with expired messages; return its URL.

    `boxes` live sessions and `ended` sessions past their expiry, each with
    `per_box` expired durable messages.
    """
    cluster, template = postgres
    url = cluster.create_database(f"expire_{next(_names)}", template=template)
    now = datetime.now(UTC)
    past, future = now - timedelta(minutes=1), now + timedelta(days=1)
    ids = [f"s_{i:05d}" for i in range(boxes + ended)]
    with psycopg.connect(url) as db, db.cursor() as cur:
        cur.executemany(
            "INSERT INTO mailbox_mailbox (session_id, created_at, last_seen_at, expires_at,"
            " last_seq, acked_seq, lost_seq, queued, high_water, ws_connections)"
            " VALUES (%s, %s, %s, %s, %s, 0, 0, %s, %s, 0)",
            [
                (sid, past, past, past if i < ended else future, per_box, per_box, per_box)
                for i, sid in enumerate(ids)
            ],
        )
        with cur.copy(
            "COPY mailbox_message (mailbox_id, seq, message_type, payload, source, durable,"
            " sent_at, expires_at) FROM STDIN"
        ) as copy:
            for sid in ids:
                for seq in range(1, per_box + 1):
                    copy.write_row((sid, seq, "t", "{}", "system", True, past, past))
    return url


def left(url: str) -> tuple[int, int, set[tuple[int, int, int]]]:
    """Return the messages and mailboxes left, and their distinct counters."""
    with psycopg.connect(url) as db:
        (messages,) = db.execute("SELECT count(*) FROM mailbox_message").fetchone() or (0,)
        (boxes,) = db.execute("SELECT count(*) FROM mailbox_mailbox").fetchone() or (0,)
        rows = db.execute("SELECT DISTINCT queued, lost_seq, high_water FROM mailbox_mailbox")
        return messages, boxes, {tuple(row) for row in rows.fetchall()}


def test_two_runs_at_once_on_postgresql_drop_each_expired_message_exactly_once(postgres):
    # 40 live sessions and 10 ended ones, 50 expired messages each: 2500 drops.
    url = seeded(postgres, boxes=40, ended=10, per_box=50)

    runs = [start({"DATABASE_URL": url}, "--batch-size", "20") for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in runs]

    for proc, (_, err) in zip(runs, outputs, strict=True):
        assert proc.returncode == 0, err
    totals = [counts(out) for out, _ in outputs]
    assert sum(t["ttl"] for t in totals) == 2500
    assert sum(t["sessions"] for t in totals) == 10
    assert left(url) == (0, 40, {(0, 50, 0)})


def test_a_mailbox_locked_by_live_traffic_is_passed_over_then_swept_once_free(postgres):
    url = seeded(postgres, boxes=3, ended=0, per_box=10)

    # A request holds one mailbox's row lock, as deliver() does mid-transaction.
    with psycopg.connect(url) as busy:
        busy.execute("SELECT 1 FROM mailbox_mailbox WHERE session_id = 's_00001' FOR UPDATE")
        proc = start({"DATABASE_URL": url}, "--batch-size", "4")

        # The sweep does not wait for it to clear the other two mailboxes.
        deadline = time.monotonic() + 60
        while left(url)[0] != 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left(url)[0] == 10
        assert proc.poll() is None
        busy.commit()

    # Once the lock is free, the same run sweeps the last mailbox.
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert counts(out)["ttl"] == 30
    assert left(url) == (0, 3, {(0, 10, 0)})
