"""`manage.py expire_mailboxes`: what it drops, counts and leaves, alone and in pairs."""

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from mailbox import signals, store
from mailbox.models import Mailbox, Message
from tests.helpers import ROOT, free_port, manage, migrated_sqlite

SUMMARY = re.compile(
    r"ttl=(?P<ttl>\d+) transport-closed=(?P<closed>\d+) acked-purged=(?P<acked>\d+)"
    r" sessions-removed=(?P<sessions>\d+) batches=(?P<batches>\d+)"
)


def counts(output: str) -> dict[str, int]:
    """Return the counts of the command's summary line."""
    lines = [line for line in output.splitlines() if line.startswith("expire_mailboxes")]
    assert len(lines) == 1, output
    match = SUMMARY.search(lines[0])
    assert match, lines[0]
    return {key: int(value) for key, value in match.groupdict().items()}


def expire(**options: Any) -> str:
    out = StringIO()
    call_command("expire_mailboxes", stdout=out, **options)
    return out.getvalue()


def age_messages(session_id: str, *seqs: int) -> None:
    """Make the given messages of a session expired a minute ago."""
    past = timezone.now() - timedelta(minutes=1)
    Message.objects.filter(mailbox_id=session_id, seq__in=seqs).update(expires_at=past)


def end_session(session_id: str) -> None:
    past = timezone.now() - timedelta(minutes=1)
    Mailbox.objects.filter(session_id=session_id).update(expires_at=past)


def deliver_many(session_id: str, n: int, durable: bool = True) -> list[int]:
    seqs = [store.deliver(session_id, f"t{i}", {"i": i}, durable=durable) for i in range(n)]
    assert None not in seqs
    return [s for s in seqs if s is not None]


def assert_counters_exact() -> None:
    """Check every mailbox's `queued` against its rows, as the invariant says."""
    for box in Mailbox.objects.all():
        unread = Message.objects.filter(mailbox=box, acked_at__isnull=True).count()
        assert box.queued == unread, box.session_id


@pytest.fixture
def events() -> Any:
    """Record the mailbox signals the sweep sends, as (signal name, kwargs)."""
    seen: list[tuple[str, dict[str, Any]]] = []
    wired = {
        "dropped": signals.messages_dropped,
        "drained": signals.mailbox_drained,
        "expired": signals.session_expired,
    }
    receivers = {}
    for name, sig in wired.items():

        def receive(sender: Any, name: str = name, **kwargs: Any) -> None:
            kwargs.pop("signal", None)
            seen.append((name, kwargs))

        receivers[name] = receive
        sig.connect(receive, weak=False)
    yield seen
    for name, sig in wired.items():
        sig.disconnect(receivers[name])


@pytest.fixture
def world(settings: Any) -> dict[str, str]:
    """Build expired, live, acknowledged and overflowing mailboxes.

    - `live`: 3 messages, none expired: untouched.
    - `stale`: 5 durable messages, seqs 2 and 4 expired: 2 ttl drops.
    - `acked`: 4 messages, 3 acknowledged (one of those expired too): 3 purged,
      no drop.
    - `full`: capacity 3, 5 delivered (2 overflowed at delivery), then the
      oldest queued one expired: 1 ttl drop.
    - `typing`: a listening session with 2 ephemeral messages, expired: 2
      transport-closed drops.
    - `gone`: a session past its expiry holding 2 durable messages and 1
      acknowledged: removed, 2 ttl drops, 1 purged.
    """
    names = ["live", "stale", "acked", "full", "typing", "gone"]
    ids = {name: store.create_session().session_id for name in names}

    deliver_many(ids["live"], 3)

    deliver_many(ids["stale"], 5)
    age_messages(ids["stale"], 2, 4)

    deliver_many(ids["acked"], 4)
    age_messages(ids["acked"], 1)
    store.ack(ids["acked"], 3)

    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    deliver_many(ids["full"], 5)
    age_messages(ids["full"], 3)

    store.rest_seen(ids["typing"], timezone.now() + timedelta(minutes=5))
    deliver_many(ids["typing"], 2, durable=False)
    age_messages(ids["typing"], 1, 2)

    deliver_many(ids["gone"], 3)
    store.ack(ids["gone"], 1)
    end_session(ids["gone"])
    return ids


def snapshot() -> list[Any]:
    boxes = list(Mailbox.objects.order_by("pk").values())
    messages = list(Message.objects.order_by("pk").values())
    return [boxes, messages]


@pytest.mark.django_db(transaction=True)
def test_it_drops_expired_messages_and_sessions_with_exact_counts(world, events):
    ids = world
    expected = {"ttl": 5, "closed": 2, "acked": 4, "sessions": 1}

    summary = counts(expire())

    assert {k: summary[k] for k in expected} == expected
    assert summary["batches"] == 2

    # Each mailbox keeps exactly its live queue; the ended session is gone.
    left = Counter(Message.objects.values_list("mailbox_id", flat=True))
    assert left == {ids["live"]: 3, ids["stale"]: 3, ids["acked"]: 1, ids["full"]: 2}
    assert not Mailbox.objects.filter(pk=ids["gone"]).exists()
    assert_counters_exact()

    # Durable drops leave a gap for a cursor below them; ephemeral ones do not.
    boxes = {box.session_id: box for box in Mailbox.objects.all()}
    assert boxes[ids["stale"]].lost_seq == 4
    assert boxes[ids["full"]].lost_seq == 3
    assert boxes[ids["typing"]].lost_seq == 0
    assert boxes[ids["live"]].lost_seq == 0

    # The signals tell the same story, by reason, and each drained mailbox once.
    drops: Counter[str] = Counter()
    for name, kw in events:
        if name == "dropped":
            drops[kw["reason"]] += kw["count"]
    assert drops == {"ttl": 5, "transport-closed": 2}
    drained = {kw["session_id"]: kw["high_water"] for name, kw in events if name == "drained"}
    assert drained == {ids["typing"]: 2, ids["gone"]: 3}
    assert [kw for name, kw in events if name == "expired"] == [
        {"session_id": ids["gone"], "count": 2}
    ]
    assert boxes[ids["typing"]].high_water == 0


@pytest.mark.django_db(transaction=True)
def test_a_second_run_finds_nothing_to_do(world):
    expire()

    summary = counts(expire())

    assert summary == {"ttl": 0, "closed": 0, "acked": 0, "sessions": 0, "batches": 0}


@pytest.mark.django_db(transaction=True)
def test_a_dry_run_counts_what_a_run_drops_and_changes_nothing(world, events):
    before = snapshot()

    preview = counts(expire(dry_run=True))

    assert snapshot() == before
    assert events == []
    assert preview == counts(expire())


@pytest.mark.django_db(transaction=True)
def test_small_batches_drop_the_same_as_one_batch(world):
    output = expire(batch_size=1, verbosity=2)

    summary = counts(output)
    assert {k: summary[k] for k in ("ttl", "closed", "acked", "sessions")} == {
        "ttl": 5,
        "closed": 2,
        "acked": 4,
        "sessions": 1,
    }
    # One row per batch for the 9 messages of live sessions, then the session.
    assert summary["batches"] == 10
    progress = [line for line in output.splitlines() if line.startswith("batch ")]
    assert len(progress) == 10
    assert progress[0].startswith("batch 1: dropped ")
    assert_counters_exact()


@pytest.mark.django_db(transaction=True)
def test_it_never_drops_a_message_that_is_still_live_or_redelivered(world):
    ids = world
    live = set(Message.objects.filter(expires_at__gt=timezone.now(), acked_at__isnull=True))

    expire()

    kept = set(Message.objects.all())
    assert {m for m in live if m.mailbox_id != ids["gone"]} == kept


def test_it_refuses_a_batch_size_out_of_range():
    result = manage("expire_mailboxes", "--batch-size", "0")

    assert result.returncode != 0
    assert "--batch-size 0 is not in 1..10000" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////nonexistent-dir/db.sqlite3",
        f"postgres://nobody:secret@127.0.0.1:{free_port()}/transport",
    ],
    ids=["sqlite-missing", "postgres-refused"],
)
def test_it_exits_non_zero_with_a_clear_message_when_the_database_is_unreachable(url):
    result = manage("expire_mailboxes", env={"DATABASE_URL": url})

    assert result.returncode == 1
    assert "database unreachable or not migrated (check DATABASE_URL)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate one SQLite file per module; tests copy it instead of migrating again."""
    path = tmp_path_factory.mktemp("expire") / "template.sqlite3"
    migrated_sqlite(path)
    return path


def seeded_sqlite(
    template: Path, path: Path, boxes: int, ended: int, per_box: int
) -> dict[str, str]:
    """Copy the migrated database and fill it with expired messages, as SQL.

    `boxes` live sessions and `ended` sessions past their expiry, each with
    `per_box` expired durable messages. Plain sqlite3 keeps the seeding out
    of a Django process start.
    """
    shutil.copy(template, path)
    now = datetime.now(UTC)
    stamp = "%Y-%m-%d %H:%M:%S.%f"
    past = (now - timedelta(minutes=1)).strftime(stamp)
    future = (now + timedelta(days=1)).strftime(stamp)
    ids = [f"s_{i:05d}" for i in range(boxes + ended)]
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO mailbox_mailbox (session_id, created_at, last_seen_at, expires_at,"
            " last_seq, acked_seq, lost_seq, queued, high_water, ws_connections)"
            " VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?, 0)",
            [
                (sid, past, past, past if i < ended else future, per_box, per_box, per_box)
                for i, sid in enumerate(ids)
            ],
        )
        db.executemany(
            "INSERT INTO mailbox_message (mailbox_id, seq, message_type, payload, source,"
            " durable, sent_at, expires_at) VALUES (?, ?, 't', '{}', 'system', 1, ?, ?)",
            [(sid, seq, past, past) for sid in ids for seq in range(1, per_box + 1)],
        )
    return {"DATABASE_URL": f"sqlite:///{path}"}


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "expire_mailboxes", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def remaining(env: dict[str, str]) -> tuple[int, int]:
    """Return the messages and mailboxes left in the database of `env`."""
    with sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        (messages,) = db.execute("SELECT count(*) FROM mailbox_message").fetchone()
        (boxes,) = db.execute("SELECT count(*) FROM mailbox_mailbox").fetchone()
    return messages, boxes


def counters(env: dict[str, str]) -> set[tuple[int, int, int]]:
    """Return the distinct (queued, lost_seq, high_water) of the mailboxes left."""
    with sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT DISTINCT queued, lost_seq, high_water FROM mailbox_mailbox")
        return set(rows.fetchall())


def test_two_runs_at_once_drop_each_expired_message_exactly_once(migrated, tmp_path):
    # 40 live sessions and 10 ended ones, 50 expired messages each: 2500 drops.
    env = seeded_sqlite(migrated, tmp_path / "db.sqlite3", boxes=40, ended=10, per_box=50)

    runs = [start(env, "--batch-size", "20") for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]

    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
    totals = [counts(out) for out, _ in outputs]
    assert sum(t["ttl"] for t in totals) == 2500
    assert sum(t["sessions"] for t in totals) == 10
    assert remaining(env) == (0, 40)
    # Each live mailbox drained once, its gap marked at its last message.
    assert counters(env) == {(0, 50, 0)}


def test_sigterm_finishes_the_current_batch_and_exits_cleanly(migrated, tmp_path):
    env = seeded_sqlite(migrated, tmp_path / "db.sqlite3", boxes=20, ended=0, per_box=500)
    run = start(env, "--batch-size", "5", "-v", "2")

    # Wait for the first batch to commit, then ask the command to stop.
    assert run.stdout is not None
    first = ""
    while not first.startswith("batch 1: "):
        first = run.stdout.readline()
        assert first, "the command ended before its first batch"
    assert first.startswith("batch 1: dropped ttl=5"), first
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=60)

    assert run.returncode == 0, err
    summary = counts(out)
    assert "stopped=SIGTERM" in out
    assert 0 < summary["batches"] < 2000
    # Every batch it reported was committed whole, nothing more and nothing less.
    assert remaining(env) == (10000 - summary["ttl"], 20)
    assert summary["ttl"] == 5 * summary["batches"]


@pytest.mark.django_db(transaction=True)
def test_a_session_kept_open_over_a_websocket_outlives_its_idle_expiry(settings):
    settings.TRANSPORT_SESSION_TTL = 3600
    session_id = store.create_session().session_id
    store.ws_opened(session_id)

    # A day later the WebSocket is still open: its lease renewals kept
    # last_seen_at fresh, so only the renewal itself can extend the session.
    Mailbox.objects.filter(pk=session_id).update(expires_at=timezone.now() + timedelta(seconds=5))
    store.ws_renewed(session_id)
    store.ack(session_id, 0)

    assert Mailbox.objects.get(pk=session_id).expires_at > timezone.now() + timedelta(minutes=59)
    assert counts(expire())["sessions"] == 0
