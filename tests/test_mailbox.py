"""The mailbox store: sequence numbers, capacity, expiry, acks and its command.

Tests use the real database. They run with transaction=True because the
store sends its signals and wake-ups from on_commit hooks, which never fire
inside the transaction a plain django_db test is wrapped in.
"""

import asyncio
import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import transaction
from django.utils import timezone

from mailbox import signals, store
from mailbox.api import adeliver, deliver, fetch
from mailbox.errors import InvalidMessage, MailboxNotFound
from mailbox.loops import GroupCommit, shared_hop
from mailbox.models import Mailbox, Message
from mailbox.wakeup import Arrival, Waiter, hub
from tests.helpers import fields, manage, migrated_sqlite, recording

pytestmark = pytest.mark.django_db(transaction=True)

DROP_FIELDS = ("session_id", "reason", "count", "message_type")
DRAIN_FIELDS = ("session_id", "high_water")


class Rollback(Exception):
    """Raised to roll a test's transaction back."""


def new_session() -> str:
    return store.create_session().session_id


def box_of(session_id: str) -> Mailbox:
    return Mailbox.objects.get(session_id=session_id)


def seqs(session_id: str) -> list[int]:
    """Return the seqs still queued, whatever their expiry."""
    rows = Message.objects.filter(mailbox_id=session_id, acked_at__isnull=True).order_by("seq")
    return list(rows.values_list("seq", flat=True))


def expire(session_id: str, *seq: int) -> None:
    """Move the expiry of the given messages into the past."""
    past = timezone.now() - timedelta(seconds=1)
    Message.objects.filter(mailbox_id=session_id, seq__in=seq).update(expires_at=past)


def listen_rest(session_id: str) -> None:
    """Mark the session as having a long-poll client, so ephemeral messages are kept."""
    store.rest_seen(session_id, timezone.now() + timedelta(seconds=60))


# --- Sequence numbers ---------------------------------------------------------


def test_it_allocates_contiguous_seqs_from_one_per_session():
    first, second = new_session(), new_session()

    assert [deliver(first, "n", {"n": n}) for n in range(3)] == [1, 2, 3]
    assert deliver(second, "n", {}) == 1

    box = box_of(first)
    assert (box.last_seq, box.queued) == (3, 3)
    assert seqs(first) == [1, 2, 3]


def test_it_never_reuses_a_seq_after_messages_are_acknowledged_or_dropped():
    session_id = new_session()
    for _ in range(3):
        deliver(session_id, "n", {})
    store.ack(session_id, 2)
    expire(session_id, 3)
    fetch(session_id, after=2)

    assert deliver(session_id, "n", {}) == 4


# --- Transactions ---------------------------------------------------------------


def test_a_rolled_back_deliver_stores_nothing_and_sends_nothing():
    session_id = new_session()

    with (
        recording(signals.message_enqueued) as (enqueued,),
        pytest.raises(Rollback),
        transaction.atomic(),
    ):
        assert deliver(session_id, "order.shipped", {"order": 1}) == 1
        raise Rollback

    assert enqueued == []
    assert seqs(session_id) == []
    assert (box_of(session_id).last_seq, box_of(session_id).queued) == (0, 0)


def test_a_deliver_in_a_committed_transaction_signals_only_after_commit():
    session_id = new_session()

    with recording(signals.message_enqueued) as (enqueued,):
        with transaction.atomic():
            seq = deliver(session_id, "order.shipped", {"order": 1})
            assert enqueued == []
        assert fields(enqueued, "session_id", "seq", "message_type", "source", "durable") == [
            {
                "session_id": session_id,
                "seq": seq,
                "message_type": "order.shipped",
                "source": "system",
                "durable": True,
            }
        ]


async def test_a_rolled_back_deliver_wakes_no_waiter_and_a_committed_one_does(settings):
    # The database watcher would find a committed message on its own; make it
    # too slow to matter, so only deliver()'s own wake-up can set the event.
    settings.TRANSPORT_CROSS_PROCESS_POLL = 60
    session_id = await sync_to_async(new_session)()

    def deliver_then_roll_back() -> None:
        with pytest.raises(Rollback), transaction.atomic():
            deliver(session_id, "n", {})
            raise Rollback

    async with hub.subscribe(session_id, known_seq=0) as waiter:
        await sync_to_async(deliver_then_roll_back)()
        assert not await waiter.wait(0.3)

        await sync_to_async(deliver)(session_id, "n", {})
        assert await waiter.wait(10)


async def test_wake_ups_from_another_thread_in_a_flow_share_the_loops_wake_ups(monkeypatch):
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    ask = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(callback.__name__)
        return ask(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    waiters = [Waiter(f"s_{i}", known_seq=0) for i in range(100)]
    for waiter in waiters:
        waiter.collect_arrivals()
    now = timezone.now()

    def wake_all() -> None:
        for i, waiter in enumerate(waiters):
            waiter.wake(Arrival(1, "n", json.dumps({"i": i}), now))

    thread = threading.Thread(target=wake_all)
    thread.start()
    while not all(waiter.woken for waiter in waiters):
        await asyncio.sleep(0.001)
    thread.join()

    assert [json.loads(waiter.take_arrivals()[0].payload_json) for waiter in waiters] == [
        {"i": i} for i in range(100)
    ]
    # One wake-up each would be 100; a thread descheduled for a while may
    # need a few.
    assert 1 <= asked.count("_take") < 10

    # After a quiet spell, the first wake-up goes at once, by itself.
    await asyncio.sleep(0.1)
    before = asked.count("_take")
    waiters[0].woken = False
    thread = threading.Thread(target=waiters[0].wake)
    thread.start()
    thread.join()
    assert asked.count("_take") == before + 1
    while not waiters[0].woken:
        await asyncio.sleep(0.001)


async def test_a_wake_up_from_the_loop_itself_never_waits_for_a_flow_of_other_threads():
    waiters = [Waiter(f"s_{i}", known_seq=0) for i in range(2)]

    # Another thread's wake-up: the loop looks again for more a little later.
    thread = threading.Thread(target=waiters[0].wake)
    thread.start()
    thread.join()
    while not waiters[0].woken:
        await asyncio.sleep(0)

    waiters[1].wake()
    await asyncio.sleep(0)
    assert waiters[1].woken


async def test_a_waiter_of_a_closed_loop_costs_the_others_nothing():
    async def make() -> Waiter:
        return Waiter("s_shared", known_seq=0)

    made: list[Waiter] = []
    thread = threading.Thread(target=lambda: made.append(asyncio.run(make())))
    thread.start()
    thread.join()
    live = Waiter("s_shared", known_seq=0)

    def wake_both() -> None:
        made[0].wake()
        live.wake()

    thread = threading.Thread(target=wake_both)
    thread.start()
    thread.join()
    await asyncio.sleep(0.05)
    assert live.woken and not made[0].woken


def test_concurrent_deliveries_from_threads_and_processes_get_unique_contiguous_seqs(
    sqlite_env, sqlite_path, cli_sessions
):
    # The suite's in-memory test database reports lock conflicts instead of
    # waiting for them, so this runs against the deployed form: a SQLite file
    # in WAL mode, two processes of four threads each, 50 deliveries a thread.
    session_id = cli_sessions[0]
    script = (
        "import json, threading\n"
        "from django.db import connection\n"
        "got = []\n"
        "def work():\n"
        "    try:\n"
        f"        got.extend(store.deliver({session_id!r}, 'n', {{}}) for _ in range(50))\n"
        "    finally:\n"
        "        connection.close()\n"
        "threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(json.dumps(got))\n"
    )

    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda _: shell(sqlite_env, script), range(2)))

    returned = sorted(seq for output in outputs for seq in json.loads(output))
    assert returned == list(range(1, 401))
    with sqlite3.connect(sqlite_path) as db:
        stored = [
            seq
            for (seq,) in db.execute(
                "SELECT seq FROM mailbox_message WHERE mailbox_id = ? ORDER BY seq", [session_id]
            )
        ]
        last_seq, queued = db.execute(
            "SELECT last_seq, queued FROM mailbox_mailbox WHERE session_id = ?", [session_id]
        ).fetchone()
    assert stored == list(range(1, 401))
    assert (last_seq, queued) == (400, 400)


# --- Capacity ------------------------------------------------------------------


async def test_async_deliveries_queued_together_each_get_their_own_outcome():
    first, second = await sync_to_async(new_session)(), await sync_to_async(new_session)()

    outcomes = await asyncio.gather(
        adeliver(first, "n", {"n": 1}),
        adeliver("s_gone", "n", {}),
        adeliver(second, "n", {"n": 2}),
        adeliver(first, "", {}),
        adeliver(first, "n", {"n": 3}),
        return_exceptions=True,
    )

    assert outcomes[0] == 1 and outcomes[2] == 1 and outcomes[4] == 2
    assert isinstance(outcomes[1], MailboxNotFound)
    assert isinstance(outcomes[3], InvalidMessage)
    assert await sync_to_async(seqs)(first) == [1, 2]


async def test_a_busy_group_commit_lingers_and_writes_what_came_meanwhile_at_once():
    writes: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        writes.append(items)
        return [item * 10 for item in items]

    commit = GroupCommit(write, linger=0.05)
    # After a quiet spell, a write goes at once; right after it, the next waits.
    assert await commit.put(1) == 10
    second = commit.put(2)
    await asyncio.sleep(0.01)
    results = await asyncio.gather(second, commit.put(3), commit.put(4))

    assert writes == [[1], [2, 3, 4]] and results == [20, 30, 40]


async def test_shared_hops_run_on_the_process_database_thread_whoever_calls():
    # A site's async view runs in a thread-sensitive context of its own,
    # whose thread ends with the request; shared calls must not go there.
    threads: list[threading.Thread] = []

    def where() -> None:
        threads.append(threading.current_thread())

    async with ThreadSensitiveContext():
        await shared_hop(where)()
    await shared_hop(where)()

    assert threads[0] is threads[1]


def test_a_full_mailbox_drops_its_oldest_message_by_default(settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    session_id = new_session()
    deliver(session_id, "first", {})
    deliver(session_id, "n", {})
    deliver(session_id, "n", {})

    with recording(signals.messages_dropped) as (dropped,):
        assert deliver(session_id, "n", {}) == 4

    assert seqs(session_id) == [2, 3, 4]
    assert box_of(session_id).queued == 3
    assert fields(dropped, *DROP_FIELDS) == [
        {"session_id": session_id, "reason": "overflow", "count": 1, "message_type": "first"}
    ]

    # A cursor below the dropped message has a gap; one past it has none.
    assert store.read(session_id, 0, 100, "mailbox").gap is True
    assert store.read(session_id, 1, 100, "mailbox").gap is False


def test_a_full_mailbox_under_reject_new_refuses_the_new_message(settings):
    settings.TRANSPORT_MAILBOX_CAPACITY = 3
    settings.TRANSPORT_OVERFLOW_POLICY = "reject-new"
    session_id = new_session()
    for _ in range(3):
        deliver(session_id, "n", {})

    with recording(signals.messages_dropped, signals.message_enqueued) as (dropped, enqueued):
        assert deliver(session_id, "late", {}) is None

    assert seqs(session_id) == [1, 2, 3]
    assert (box_of(session_id).last_seq, box_of(session_id).queued) == (3, 3)
    assert enqueued == []
    assert fields(dropped, *DROP_FIELDS) == [
        {"session_id": session_id, "reason": "overflow", "count": 1, "message_type": "late"}
    ]
    assert fetch(session_id).gap is False


# --- Expiry --------------------------------------------------------------------


def test_a_message_expires_its_ttl_after_it_was_sent(settings):
    settings.TRANSPORT_MESSAGE_TTL = 3600
    settings.TRANSPORT_EPHEMERAL_TTL = 30
    session_id = new_session()
    listen_rest(session_id)

    deliver(session_id, "default", {})
    deliver(session_id, "short", {}, ttl=5)
    deliver(session_id, "typing", {}, durable=False, ttl=600)

    lifetimes = {
        m.message_type: m.expires_at - m.sent_at
        for m in Message.objects.filter(mailbox_id=session_id)
    }
    assert lifetimes == {
        "default": timedelta(seconds=3600),
        "short": timedelta(seconds=5),
        # Ephemeral messages never outlive TRANSPORT_EPHEMERAL_TTL.
        "typing": timedelta(seconds=30),
    }


@pytest.mark.parametrize("how", ["fetch", "read"])
def test_an_expired_message_is_never_returned_and_is_dropped_as_ttl(how):
    session_id = new_session()
    for n in (1, 2, 3):
        deliver(session_id, "n", {"n": n})
    expire(session_id, 2)

    with recording(signals.messages_dropped) as (dropped,):
        batch = fetch(session_id) if how == "fetch" else store.read(session_id, 0, 100, "mailbox")

    assert [m.seq for m in batch.messages] == [1, 3]
    assert batch.gap is True
    assert fields(dropped, *DROP_FIELDS) == [
        {"session_id": session_id, "reason": "ttl", "count": 1, "message_type": "n"}
    ]
    assert seqs(session_id) == [1, 3]
    assert box_of(session_id).queued == 2

    # Every later fetch honours the drop too, and counts it only once.
    with recording(signals.messages_dropped) as (again,):
        assert [m.seq for m in store.read(session_id, 0, 100, "mailbox").messages] == [1, 3]
    assert again == []


def test_an_expired_message_is_dropped_even_when_nothing_is_left_to_return():
    session_id = new_session()
    deliver(session_id, "n", {})
    expire(session_id, 1)

    batch = fetch(session_id)

    assert batch.messages == []
    assert batch.gap is True
    assert batch.next_after == 1
    assert fetch(session_id, after=batch.next_after).gap is False


def test_an_expired_ephemeral_message_is_dropped_as_transport_closed_without_a_gap():
    session_id = new_session()
    listen_rest(session_id)
    deliver(session_id, "order", {})
    deliver(session_id, "typing", {}, durable=False)
    expire(session_id, 2)

    with recording(signals.messages_dropped) as (dropped,):
        batch = fetch(session_id)

    assert [m.seq for m in batch.messages] == [1]
    assert batch.gap is False
    assert fields(dropped, *DROP_FIELDS) == [
        {
            "session_id": session_id,
            "reason": "transport-closed",
            "count": 1,
            "message_type": "typing",
        }
    ]


def test_an_ephemeral_message_for_a_session_nobody_listens_to_is_dropped():
    session_id = new_session()

    with recording(signals.messages_dropped) as (dropped,):
        assert deliver(session_id, "typing", {}, durable=False) is None

    assert seqs(session_id) == []
    assert fields(dropped, *DROP_FIELDS) == [
        {
            "session_id": session_id,
            "reason": "transport-closed",
            "count": 1,
            "message_type": "typing",
        }
    ]


# --- Acknowledgement -------------------------------------------------------------


def test_an_ack_acknowledges_every_message_up_to_its_seq():
    session_id = new_session()
    for _ in range(5):
        deliver(session_id, "n", {})

    store.ack(session_id, 3)

    assert seqs(session_id) == [4, 5]
    assert [m.seq for m in store.read(session_id, 0, 100, "mailbox").messages] == [4, 5]
    box = box_of(session_id)
    assert (box.acked_seq, box.queued) == (3, 2)

    # An older ack changes nothing.
    store.ack(session_id, 1)
    assert (box_of(session_id).acked_seq, box_of(session_id).queued) == (3, 2)


def test_acks_of_several_sessions_are_stored_together_and_a_dead_session_is_passed_over():
    first, second, gone = new_session(), new_session(), new_session()
    for session_id in (first, second, gone):
        for _ in range(3):
            deliver(session_id, "n", {})
    Mailbox.objects.filter(session_id=gone).update(expires_at=timezone.now())

    store.ack_many([(first, 2), (gone, 3), (second, 3)])

    assert (box_of(first).acked_seq, box_of(first).queued) == (2, 1)
    assert (box_of(second).acked_seq, box_of(second).queued) == (3, 0)
    assert (box_of(gone).acked_seq, box_of(gone).queued) == (0, 3)


def test_an_ack_beyond_the_last_seq_does_not_acknowledge_future_messages():
    session_id = new_session()
    deliver(session_id, "n", {})
    deliver(session_id, "n", {})

    store.ack(session_id, 100)

    assert box_of(session_id).acked_seq == 2
    assert deliver(session_id, "later", {}) == 3
    assert [m.seq for m in fetch(session_id).messages] == [3]


def test_a_draining_mailbox_reports_its_high_water_mark_then_starts_over():
    session_id = new_session()
    for _ in range(3):
        deliver(session_id, "n", {})

    with recording(signals.mailbox_drained) as (drained,):
        store.ack(session_id, 2)
        assert drained == []

        store.ack(session_id, 3)
        assert fields(drained, *DRAIN_FIELDS) == [{"session_id": session_id, "high_water": 3}]

        deliver(session_id, "n", {})
        fetch(session_id, after=4)
        assert fields(drained[1:], *DRAIN_FIELDS) == [{"session_id": session_id, "high_water": 1}]

        # A mailbox emptied by expiry drains as well.
        deliver(session_id, "n", {})
        deliver(session_id, "n", {})
        expire(session_id, 5, 6)
        fetch(session_id, after=4)
        assert fields(drained[2:], *DRAIN_FIELDS) == [{"session_id": session_id, "high_water": 2}]

    assert box_of(session_id).high_water == 0


# --- Errors ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["unknown", "expired"])
def test_every_call_on_a_missing_or_expired_session_raises_mailbox_not_found(state):
    if state == "unknown":
        session_id = "s_nobody"
    else:
        session_id = new_session()
        past = timezone.now() - timedelta(seconds=1)
        Mailbox.objects.filter(session_id=session_id).update(expires_at=past)

    for call in (
        lambda: deliver(session_id, "n", {}),
        lambda: fetch(session_id),
        lambda: store.read(session_id, 0, 100, "mailbox"),
        lambda: store.ack(session_id, 1),
        lambda: store.get_live(session_id),
    ):
        with pytest.raises(MailboxNotFound) as raised:
            call()
        assert raised.value.session_id == session_id


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("message_type", {"message_type": ""}),
        ("message_type", {"message_type": "x" * 201}),
        ("message_type", {"message_type": 42}),
        ("message_type", {"message_type": None}),
        ("ttl", {"ttl": 0}),
        ("ttl", {"ttl": -5}),
        ("ttl", {"ttl": "60"}),
        ("ttl", {"ttl": 1.5}),
    ],
)
def test_a_bad_message_type_or_ttl_raises_invalid_message_and_stores_nothing(field, kwargs):
    session_id = new_session()
    args = {"message_type": "n", **kwargs}

    with pytest.raises(InvalidMessage) as raised:
        deliver(session_id, args.pop("message_type"), {}, **args)

    assert raised.value.field == field
    assert seqs(session_id) == []


# --- manage.py deliver -------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mailbox") / "db.sqlite3"


@pytest.fixture(scope="module")
def sqlite_env(sqlite_path: Path) -> dict[str, str]:
    """Migrate a SQLite file once for this module's command-line tests."""
    return migrated_sqlite(sqlite_path)


@pytest.fixture(scope="module")
def cli_sessions(sqlite_env: dict[str, str]) -> list[str]:
    """Create sessions in the SQLite file, in one process: each start costs a second."""
    code = "print(' '.join(store.create_session().session_id for _ in range(3)))"
    return shell(sqlite_env, code).split()


def shell(env: dict[str, str], code: str) -> str:
    """Run Python in `manage.py shell` against `env`'s database; return its last line."""
    result = manage("shell", "-c", "from mailbox import store\n" + code, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_deliver_command_queues_a_message(sqlite_env, sqlite_path, cli_sessions):
    session_id = cli_sessions[1]

    result = manage("deliver", session_id, "order.shipped", '{"order": 42}', env=sqlite_env)

    assert result.returncode == 0, result.stderr
    assert f"seq=1 to {session_id}" in result.stdout
    with sqlite3.connect(sqlite_path) as db:
        rows = db.execute(
            "SELECT seq, message_type, payload, durable, sent_at, expires_at"
            " FROM mailbox_message WHERE mailbox_id = ?",
            [session_id],
        ).fetchall()
    [(seq, message_type, payload, durable, sent_at, expires_at)] = rows
    assert (seq, message_type, json.loads(payload), durable) == (
        1,
        "order.shipped",
        {"order": 42},
        1,
    )
    assert datetime.fromisoformat(expires_at) > datetime.fromisoformat(sent_at)


@pytest.mark.parametrize(
    "session, args, complaint",
    [
        (None, ["order.shipped", "{not json"], "payload is not JSON"),
        (None, ["order.shipped", "{}", "--ttl", "0"], "invalid ttl"),
        (None, ["typing", "{}", "--ephemeral"], "message dropped"),
        ("s_nobody", ["order.shipped", "{}"], "no such session: 's_nobody'"),
    ],
)
def test_the_deliver_command_refuses_bad_input_with_a_clear_message(
    sqlite_env, sqlite_path, cli_sessions, session, args, complaint
):
    session_id = session or cli_sessions[2]

    result = manage("deliver", session_id, *args, env=sqlite_env)

    assert result.returncode != 0
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr
    with sqlite3.connect(sqlite_path) as db:
        count = db.execute(
            "SELECT count(*) FROM mailbox_message WHERE mailbox_id = ?", [session_id]
        ).fetchone()
    assert count == (0,)


def test_a_cursor_past_the_last_seq_is_taken_back_so_later_messages_arrive():
    # A client restored from a newer backup than the database asks after 10.
    session_id = new_session()
    deliver(session_id, "a", {})
    deliver(session_id, "b", {})

    behind = fetch(session_id, after=10)
    deliver(session_id, "c", {})
    later = fetch(session_id, after=behind.next_after)

    assert behind.messages == [] and behind.next_after == 2
    assert [m.seq for m in later.messages] == [3]


def test_a_payload_that_is_not_json_is_refused_and_nothing_is_stored():
    session_id = new_session()

    with pytest.raises(InvalidMessage, match="payload"):
        deliver(session_id, "bad", {"when": datetime.now()})

    assert seqs(session_id) == []
    assert box_of(session_id).last_seq == 0
