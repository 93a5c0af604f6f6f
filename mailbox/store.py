"""Store, fetch and acknowledge messages: the database is the source of truth.

Every function here is synchronous and runs in one transaction that takes
the mailbox's row lock first, so sequence allocation, capacity and the
`queued` counter stay exact under concurrent writers. Wake-ups and signals
go out only after that transaction commits.
"""

import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from mailbox import signals, wakeup
from mailbox.errors import InvalidMessage, MailboxNotFound
from mailbox.models import Mailbox, Message
from mailbox.rows import database, queued_after, read_mailbox, save_mailbox
from mailbox.tracing import traced

DROP_TTL = "ttl"
DROP_OVERFLOW = "overflow"
DROP_TRANSPORT_CLOSED = "transport-closed"

# A session's `last_seen_at` is written at most this often: every poll and
# frame touching the row would serialise all traffic of a session on it.
TOUCH_INTERVAL = timedelta(seconds=60)

# A WebSocket's lease on the `ws` state; its consumer renews it at a third of
# this, so one missed renewal does not flap the session to `mailbox`.
WS_LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class StoredMessage:
    """A message as a transport sends it."""

    seq: int
    message_type: str
    payload: Any
    sent_at: datetime


@dataclass
class Batch:
    """What a fetch returns: messages after the cursor, and where to go next."""

    messages: list[StoredMessage] = field(default_factory=list)
    next_after: int = 0
    gap: bool = False
    last_seq: int = 0


def _locked(session_id: str, now: datetime) -> Mailbox:
    """Return the live mailbox, holding its row lock until the transaction ends."""
    return _live(session_id, now, lock=True)


def _live(session_id: str, now: datetime, lock: bool) -> Mailbox:
    box = read_mailbox(session_id, lock=lock)
    if box is None or box.expires_at <= now:
        raise MailboxNotFound(session_id)
    return box


def _on_commit(fn: Any, **kwargs: Any) -> None:
    transaction.on_commit(lambda: fn(**kwargs), robust=True)


def _send(signal: Any, **kwargs: Any) -> None:
    signal.send_robust(sender=Mailbox, **kwargs)


def create_session(now: datetime | None = None) -> Mailbox:
    """Create a session with its empty mailbox."""
    now = now or timezone.now()
    box = Mailbox.objects.create(
        session_id="s_" + secrets.token_urlsafe(16),
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(seconds=settings.TRANSPORT_SESSION_TTL),
    )
    _on_commit(_send, signal=signals.session_created, session_id=box.session_id)
    return box


def get_live(session_id: str, now: datetime | None = None) -> Mailbox:
    """Return the mailbox of a live session, or raise MailboxNotFound."""
    return _live(session_id, now or timezone.now(), lock=False)


def is_live_transport(box: Mailbox, now: datetime) -> bool:
    """Tell whether a client is listening now, over a WebSocket or a long-poll."""
    ws = box.ws_connections > 0 and box.ws_until is not None and box.ws_until > now
    rest = box.rest_until is not None and box.rest_until > now
    return ws or rest


def transport_of(box: Mailbox, now: datetime) -> str:
    """Return the session's transport: ws, rest or mailbox."""
    if box.ws_connections > 0 and box.ws_until is not None and box.ws_until > now:
        return "ws"
    if box.rest_until is not None and box.rest_until > now:
        return "rest"
    return "mailbox"


def _validate(message_type: str, ttl: int | None) -> None:
    if not isinstance(message_type, str) or not 0 < len(message_type) <= 200:
        raise InvalidMessage("message_type", message_type, "a string of 1 to 200 characters")
    if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
        raise InvalidMessage("ttl", ttl, "a positive number of seconds")


def _drop_oldest(box: Mailbox) -> None:
    """Make room for one message by dropping the oldest queued one."""
    oldest = Message.objects.filter(mailbox=box, acked_at__isnull=True).order_by("seq").first()
    if oldest is None:
        return
    oldest.delete()
    box.queued -= 1
    if oldest.durable:
        box.lost_seq = max(box.lost_seq, oldest.seq)
    _on_commit(
        _send,
        signal=signals.messages_dropped,
        session_id=box.session_id,
        reason=DROP_OVERFLOW,
        count=1,
        message_type=oldest.message_type,
    )


@traced("Transport.Mailbox.deliver/2")
def deliver(
    session_id: str,
    message_type: str,
    payload: Any,
    *,
    durable: bool = True,
    ttl: int | None = None,
    source: str = Message.Source.SYSTEM,
) -> int | None:
    """Store a message in a session's mailbox and wake its live transport.

    Returns the message's seq, or None when it was not stored: an ephemeral
    message for a session nobody is listening to (dropped as
    `transport-closed`), or a full mailbox under `reject-new` (dropped as
    `overflow`). Inside a caller's transaction the message is stored with it,
    and nothing is woken or counted unless it commits.
    """
    _validate(message_type, ttl)
    data = _payload_json(payload)
    now = timezone.now()
    with transaction.atomic():
        box = _locked(session_id, now)
        dropped = _refuse(box, message_type, durable, now)
        if dropped:
            _on_commit(
                _send,
                signal=signals.messages_dropped,
                session_id=session_id,
                reason=dropped,
                count=1,
                message_type=message_type,
            )
            return None
        if box.queued >= settings.TRANSPORT_MAILBOX_CAPACITY:
            _drop_oldest(box)

        # The row lock makes read-increment-write safe: no other writer can
        # allocate between our read of last_seq and this update.
        box.last_seq += 1
        box.queued += 1
        box.high_water = max(box.high_water, box.queued)

        lifetime = ttl or settings.TRANSPORT_MESSAGE_TTL
        if not durable:
            lifetime = min(lifetime, settings.TRANSPORT_EPHEMERAL_TTL)
        _store(box, message_type, data, source, durable, now, lifetime)
        seq = box.last_seq
        arrival = wakeup.Arrival(seq, message_type, data, now)
        _on_commit(wakeup.notify, session_id=session_id, seq=seq, arrival=arrival)
        _on_commit(
            _send,
            signal=signals.message_enqueued,
            session_id=session_id,
            seq=seq,
            message_type=message_type,
            source=source,
            durable=durable,
        )
    return seq


def _payload_json(payload: Any) -> str:
    """Serialise a payload as its JSON column stores it, or raise InvalidMessage."""
    try:
        return json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage("payload", type(payload).__name__, str(exc)) from None


def _store(
    box: Mailbox,
    message_type: str,
    data: str,
    source: str,
    durable: bool,
    now: datetime,
    lifetime: int,
) -> None:
    """Write a locked mailbox's new counters and its new message: two statements.

    Plain SQL, because every message costs these two writes under the
    mailbox's lock, and the ORM's save and create cost several times the
    statements themselves; the lock is held for less.
    """
    db = database()
    ops = db.ops
    payload = "CAST(%s AS jsonb)" if db.vendor == "postgresql" else "%s"
    with db.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_MAILBOX} SET last_seq = %s, queued = %s, high_water = %s, lost_seq = %s"
            " WHERE session_id = %s",
            [box.last_seq, box.queued, box.high_water, box.lost_seq, box.session_id],
        )
        cursor.execute(
            f"INSERT INTO {_MESSAGE} (mailbox_id, seq, message_type, payload, source,"
            " durable, sent_at, expires_at, acked_at)"
            f" VALUES (%s, %s, %s, {payload}, %s, %s, %s, %s, NULL)",
            [
                box.session_id,
                box.last_seq,
                message_type,
                data,
                source,
                durable,
                ops.adapt_datetimefield_value(now),
                ops.adapt_datetimefield_value(now + timedelta(seconds=lifetime)),
            ],
        )


_MAILBOX = Mailbox._meta.db_table
_MESSAGE = Message._meta.db_table


def _refuse(box: Mailbox, message_type: str, durable: bool, now: datetime) -> str | None:
    """Return the drop reason when a new message must not be stored."""
    if not durable and not is_live_transport(box, now):
        return DROP_TRANSPORT_CLOSED
    full = box.queued >= settings.TRANSPORT_MAILBOX_CAPACITY
    if full and settings.TRANSPORT_OVERFLOW_POLICY == "reject-new":
        return DROP_OVERFLOW
    return None


def _ack(box: Mailbox, seq: int, now: datetime) -> None:
    """Acknowledge every message with seq <= `seq`, on a locked mailbox."""
    seq = min(seq, box.last_seq)
    if seq <= box.acked_seq:
        return
    db = database()
    with db.cursor() as cursor:
        cursor.execute(_ACK_SQL, [db.ops.adapt_datetimefield_value(now), box.pk, seq])
        count = cursor.rowcount
    box.acked_seq = seq
    box.queued -= count
    _drain_if_empty(box, had=count)


_ACK_SQL = (
    f"UPDATE {_MESSAGE} SET acked_at = %s WHERE mailbox_id = %s AND seq <= %s AND acked_at IS NULL"
)


def _drain_if_empty(box: Mailbox, had: int) -> None:
    """Observe and reset the high-water mark when the queue has just emptied."""
    if box.queued > 0 or had == 0 or box.high_water == 0:
        return
    _on_commit(
        _send,
        signal=signals.mailbox_drained,
        session_id=box.session_id,
        high_water=box.high_water,
    )
    box.high_water = 0


def ack(session_id: str, seq: int) -> None:
    """Acknowledge every message of a session with seq <= `seq` (cumulative)."""
    now = timezone.now()
    with transaction.atomic():
        _ack_and_save(_locked(session_id, now), seq, now)


def ack_many(acks: list[tuple[str, int]]) -> None:
    """Acknowledge up to a seq in each of several sessions, in one transaction.

    A session that is no longer live is passed over: its messages are gone.
    """
    now = timezone.now()
    with transaction.atomic():
        for session_id, seq in acks:
            try:
                box = _locked(session_id, now)
            except MailboxNotFound:
                continue
            _ack_and_save(box, seq, now)


def _ack_and_save(box: Mailbox, seq: int, now: datetime) -> None:
    _ack(box, seq, now)
    _touch(box, now)
    save_mailbox(box, ["acked_seq", "queued", "high_water", "last_seen_at", "expires_at"])


def _touch(box: Mailbox, now: datetime) -> None:
    if _touch_due(box, now):
        box.last_seen_at = now
        box.expires_at = now + timedelta(seconds=settings.TRANSPORT_SESSION_TTL)


def _drop_expired(box: Mailbox, rows: list[Message], now: datetime) -> None:
    """Drop expired messages met by a fetch, counting each by its reason."""
    ids = [m.pk for m in rows]
    Message.objects.filter(pk__in=ids).delete()
    box.queued -= len(ids)
    durable = [m for m in rows if m.durable]
    if durable:
        box.lost_seq = max(box.lost_seq, max(m.seq for m in durable))

    # An ephemeral message left unread means nobody was listening: it counts
    # as `transport-closed`, and its loss is no gap in the durable stream.
    ephemeral = [m for m in rows if not m.durable]
    for reason, group in ((DROP_TTL, durable), (DROP_TRANSPORT_CLOSED, ephemeral)):
        if group:
            _on_commit(
                _send,
                signal=signals.messages_dropped,
                session_id=box.session_id,
                reason=reason,
                count=len(group),
                message_type=group[0].message_type if len(group) == 1 else None,
            )


@traced("Transport.Mailbox.fetch/2")
def fetch(
    session_id: str, after: int, limit: int, transport: str, acknowledge: bool = True
) -> Batch:
    """Acknowledge up to `after`, then return queued messages with seq > `after`.

    Expired messages met on the way are dropped, never returned. `gap` is
    true when a durable message after the cursor was dropped unread; then
    `next_after` moves past it so the client's next fetch clears the flag.
    A cursor past the last allocated seq (a database restored from a
    backup) is taken back to it, so later messages are not skipped.

    Most fetches change nothing: they read without locking, and take the
    mailbox's lock only to acknowledge, drop or touch.
    """
    now = timezone.now()
    box = get_live(session_id, now)
    after = min(after, box.last_seq)
    if not (acknowledge and after > box.acked_seq) and not _touch_due(box, now):
        # The mailbox is read before its messages: one committed meanwhile
        # has a seq above this last_seq, so next_after cannot pass it.
        rows = queued_after(session_id, after, limit)
        if all(m.expires_at > now for m in rows):
            return _batch(box, after, rows, rows, limit, transport)

    with transaction.atomic():
        box = _locked(session_id, now)
        after, rows = _fetch_locked(box, after, limit, acknowledge, now)
        save_mailbox(box, _FETCH_FIELDS)
    live = [m for m in rows if m.expires_at > now]
    return _batch(box, after, rows, live, limit, transport)


@traced("Transport.Mailbox.fetch/2")
def rest_fetch(session_id: str, until: datetime, after: int, limit: int) -> tuple[str, Batch]:
    """Hold the session on `rest` until `until` and fetch as fetch() does, in one transaction.

    A long-poll does both on every request: one lock and one write instead
    of two of each. Return the transport the session had, and the batch.
    """
    now = timezone.now()
    with transaction.atomic():
        box = _locked(session_id, now)
        before = _hold_on_rest(box, until, now)
        after, rows = _fetch_locked(box, after, limit, True, now)
        save_mailbox(box, [*_FETCH_FIELDS, "rest_until"])
    live = [m for m in rows if m.expires_at > now]
    return before, _batch(box, after, rows, live, limit, "rest")


# What a fetch may change on its locked mailbox.
_FETCH_FIELDS = ["acked_seq", "queued", "lost_seq", "high_water", "last_seen_at", "expires_at"]


def _fetch_locked(
    box: Mailbox, after: int, limit: int, acknowledge: bool, now: datetime
) -> tuple[int, list[Message]]:
    """Acknowledge, read and drop what expired, on a locked mailbox; save is the caller's.

    Return the cursor (taken back to the last allocated seq) and the rows met.
    """
    after = min(after, box.last_seq)
    if acknowledge:
        _ack(box, after, now)
    rows = queued_after(box.session_id, after, limit)
    expired = [m for m in rows if m.expires_at <= now]
    if expired:
        _drop_expired(box, expired, now)
        _drain_if_empty(box, had=len(expired))
    _touch(box, now)
    return after, rows


def _touch_due(box: Mailbox, now: datetime) -> bool:
    return now - box.last_seen_at >= TOUCH_INTERVAL


def _batch(
    box: Mailbox,
    after: int,
    rows: list[Message],
    live: list[Message],
    limit: int,
    transport: str,
) -> Batch:
    """Build a fetch's answer from the rows it met and those still alive."""
    batch = Batch(gap=box.lost_seq > after, last_seq=box.last_seq)
    batch.messages = [StoredMessage(m.seq, m.message_type, m.payload, m.sent_at) for m in live]
    if batch.messages:
        batch.next_after = batch.messages[-1].seq
    elif len(rows) < limit:
        # Nothing is queued past the cursor: every seq up to last_seq was
        # acknowledged or dropped, so the client may move its cursor there.
        batch.next_after = max(after, box.last_seq)
    else:
        batch.next_after = max(after, max(m.seq for m in rows))
    if batch.messages:
        count_delivered(box.session_id, transport, batch.messages)
    return batch


def count_delivered(session_id: str, transport: str, messages: list[StoredMessage]) -> None:
    """Tell that `messages` were handed to a client of `transport`."""
    _send(
        signals.messages_delivered,
        session_id=session_id,
        transport=transport,
        messages=[(m.seq, m.message_type) for m in messages],
    )


def read(session_id: str, after: int, limit: int, transport: str) -> Batch:
    """Return queued messages with seq > `after`, acknowledging nothing."""
    return fetch(session_id, after, limit, transport, acknowledge=False)


def drop_ephemeral(session_id: str) -> None:
    """Drop a session's unacknowledged ephemeral messages: its transport closed."""
    now = timezone.now()
    with transaction.atomic():
        try:
            box = _locked(session_id, now)
        except MailboxNotFound:
            return
        rows = list(Message.objects.filter(mailbox=box, durable=False, acked_at__isnull=True))
        if not rows:
            return
        _drop_expired(box, rows, now)
        _drain_if_empty(box, had=len(rows))
        save_mailbox(box, ["queued", "high_water"])


def ws_opened(session_id: str) -> str:
    """Count an open WebSocket on the session; return the transport it had."""
    now = timezone.now()
    with transaction.atomic():
        box = _locked(session_id, now)
        before = transport_of(box, now)
        box.ws_connections += 1
        box.ws_until = now + WS_LEASE
        _touch(box, now)
        save_mailbox(box, ["ws_connections", "ws_until", "last_seen_at", "expires_at"])
    return before


def ws_renewed(*session_ids: str) -> None:
    """Extend the leases of sessions' open WebSockets, and the sessions' life with them.

    Renewals keep `last_seen_at` fresh, so _touch() would never extend the
    expiry of a session that stays connected: it is extended here.
    """
    now = timezone.now()
    # SQLite binds at most 32766 parameters per statement.
    for start in range(0, len(session_ids), 1000):
        Mailbox.objects.filter(session_id__in=session_ids[start : start + 1000]).update(
            ws_until=now + WS_LEASE,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=settings.TRANSPORT_SESSION_TTL),
        )


def ws_closed(session_id: str) -> str:
    """Count a closed WebSocket; return the transport the session has now."""
    now = timezone.now()
    with transaction.atomic():
        try:
            box = _locked(session_id, now)
        except MailboxNotFound:
            return "mailbox"
        box.ws_connections = max(0, box.ws_connections - 1)
        if box.ws_connections == 0:
            box.ws_until = None
        save_mailbox(box, ["ws_connections", "ws_until"])
        return transport_of(box, now)


def rest_seen(session_id: str, until: datetime) -> str:
    """Hold the session on `rest` until `until`; return the transport it had."""
    now = timezone.now()
    with transaction.atomic():
        box = _locked(session_id, now)
        before = _hold_on_rest(box, until, now)
        _touch(box, now)
        save_mailbox(box, ["rest_until", "last_seen_at", "expires_at"])
    return before


def _hold_on_rest(box: Mailbox, until: datetime, now: datetime) -> str:
    """Keep a locked session on `rest` until `until`; return the transport it had."""
    before = transport_of(box, now)
    if box.rest_until is None or box.rest_until < until:
        box.rest_until = until
    return before


def last_seqs(session_ids: list[str]) -> dict[str, int]:
    """Return the last allocated seq of each named session, in a query per thousand.

    Every waiting server asks this for all its sessions several times a
    second: plain SQL, and SQLite binds at most 32766 parameters.
    """
    found: dict[str, int] = {}
    with database().cursor() as cursor:
        for start in range(0, len(session_ids), 1000):
            chunk = session_ids[start : start + 1000]
            marks = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                f"SELECT session_id, last_seq FROM {_MAILBOX} WHERE session_id IN ({marks})",
                chunk,
            )
            found.update(cursor.fetchall())
    return found
