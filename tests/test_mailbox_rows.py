"""The prepared statements of the message path read and write what the ORM would."""

from datetime import timedelta

import pytest
from django.forms.models import model_to_dict
from django.utils import timezone

from mailbox import store
from mailbox.api import deliver
from mailbox.models import Mailbox, Message
from mailbox.rows import queued_after, read_mailbox, save_mailbox

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_mailbox_reads_as_the_orm_reads_it_datetimes_and_nulls_included():
    session_id = store.create_session().session_id
    Mailbox.objects.filter(pk=session_id).update(
        rest_until=timezone.now() + timedelta(seconds=30), last_seq=7, queued=3
    )

    box = read_mailbox(session_id)

    expected = Mailbox.objects.get(pk=session_id)
    assert box is not None
    assert model_to_dict(box) == model_to_dict(expected)
    assert box.ws_until is None and box.rest_until is not None
    assert box.expires_at.tzinfo is not None
    assert read_mailbox("s_missing") is None


def test_saving_writes_the_named_fields_only():
    session_id = store.create_session().session_id
    box = read_mailbox(session_id)
    assert box is not None
    until = timezone.now() + timedelta(minutes=5)
    box.rest_until = until
    box.queued = 99  # changed in memory, not named: must not be written

    save_mailbox(box, ["rest_until"])

    stored = Mailbox.objects.get(pk=session_id)
    assert stored.rest_until == until
    assert stored.queued == 0


def test_the_queue_reads_unacknowledged_messages_in_order_up_to_the_limit():
    session_id = store.create_session().session_id
    for n in range(5):
        deliver(session_id, "note", {"n": n, "text": "é"})
    store.ack(session_id, 1)

    rows = queued_after(session_id, 0, 3)

    assert [m.seq for m in rows] == [2, 3, 4]
    assert [m.payload for m in rows] == [{"n": n, "text": "é"} for n in (1, 2, 3)]
    expected = Message.objects.get(mailbox_id=session_id, seq=2)
    first = rows[0]
    assert (first.pk, first.message_type, first.durable) == (expected.pk, "note", True)
    assert (first.sent_at, first.expires_at) == (expected.sent_at, expected.expires_at)
    assert queued_after(session_id, 5, 10) == []


def test_last_seqs_answer_for_more_sessions_than_one_statement_binds():
    now = timezone.now()
    boxes = [
        Mailbox(
            session_id=f"s_{n:05d}", created_at=now, last_seen_at=now, expires_at=now, last_seq=n
        )
        for n in range(2500)
    ]
    Mailbox.objects.bulk_create(boxes)

    found = store.last_seqs([box.session_id for box in boxes] + ["s_missing"])

    assert found == {box.session_id: box.last_seq for box in boxes}
