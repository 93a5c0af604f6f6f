"""Sweep the mailboxes: drop expired messages, purge acknowledged ones, end idle sessions.

`manage.py expire_mailboxes` runs `sweep()` from cron. The sweep works in
short transactions ("batches"), each taking the row locks of the mailboxes
it touches before it reads their messages, exactly as deliver() and fetch()
do, so it runs beside live traffic and beside another sweep:

- on PostgreSQL the locks are taken with `SELECT ... FOR UPDATE SKIP
  LOCKED`: a mailbox held by a live request or by another sweep is passed
  over while the sweep goes on, and taken at the end of the run, once its
  lock is free;
- on SQLite every write transaction takes the database's one write lock at
  BEGIN (see DATABASES in settings), so two sweeps and the live traffic take
  turns batch by batch. A batch reads the rows only after it holds that
  lock, so what one sweep removed the other never sees.

Either way a message is counted by the one transaction that deletes it, and
an acknowledged message is purged without being counted as a drop.
"""

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Count, Max, Min, Q
from django.utils import timezone

from mailbox import signals
from mailbox.models import Mailbox, Message
from mailbox.store import DROP_TRANSPORT_CLOSED, DROP_TTL, _drain_if_empty, _on_commit, _send

logger = logging.getLogger(__name__)

# Rows examined per transaction. On SQLite a batch holds the database's write
# lock, and live deliveries wait for it: a thousand rows take a few
# milliseconds, far below the 20 s busy timeout a waiting request allows.
DEFAULT_BATCH_SIZE = 1000

# SQLite accepts 32766 bound parameters per statement; a batch deletes its
# rows by primary key in one statement.
MAX_BATCH_SIZE = 10000

# Sessions removed per transaction are fewer than rows: each may hold up to
# its capacity of queued messages, all deleted in the same transaction.
SESSIONS_PER_ROW_BATCH = 10

Cursor = tuple[str, int]

# What a batch reads of each message: never the payload.
ROW = ("pk", "mailbox_id", "seq", "durable", "message_type", "acked_at")


@dataclass
class SweepResult:
    """What a sweep dropped, purged and removed, or would have in a dry run."""

    ttl: int = 0
    transport_closed: int = 0
    acked: int = 0
    sessions: int = 0
    batches: int = 0
    stopped: bool = False

    def add(self, other: "SweepResult") -> None:
        self.ttl += other.ttl
        self.transport_closed += other.transport_closed
        self.acked += other.acked
        self.sessions += other.sessions
        self.batches += other.batches

    def summary(self, dry_run: bool = False) -> str:
        """Return the one line an operator (or a log collector) reads."""
        verb = "would drop" if dry_run else "dropped"
        line = (
            f"{verb} ttl={self.ttl} transport-closed={self.transport_closed}"
            f" acked-purged={self.acked} sessions-removed={self.sessions}"
            f" batches={self.batches}"
        )
        if self.stopped:
            line += " stopped=SIGTERM"
        return line


def sweep(
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    now: datetime | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[SweepResult, SweepResult], None] | None = None,
) -> SweepResult:
    """Sweep every mailbox in batches; return the totals.

    1. Messages of live sessions: expired ones are dropped (durable as `ttl`,
       ephemeral as `transport-closed`), acknowledged ones purged.
    2. Sessions idle past their expiry are removed with their mailboxes;
       what they still held counts as dropped, by the same reasons.

    `should_stop` is asked between batches (SIGTERM); `progress` is called
    after each batch with that batch's counts and the running totals. A dry
    run reads the same rows in the same batches, locks and changes nothing.
    """
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size {batch_size} not in 1..{MAX_BATCH_SIZE}")
    now = now or timezone.now()
    total = SweepResult()

    steps = (_message_batches, _session_batches)
    for step in steps:
        for batch in step(now, batch_size, dry_run):
            batch.batches = 1
            total.add(batch)
            if progress is not None:
                progress(batch, total)
            if should_stop():
                total.stopped = True
                return total
    return total


def _after(cursor: Cursor) -> Q:
    box, seq = cursor
    return Q(mailbox_id__gt=box) | Q(mailbox_id=box, seq__gt=seq)


def _up_to(cursor: Cursor) -> Q:
    box, seq = cursor
    return Q(mailbox_id__lt=box) | Q(mailbox_id=box, seq__lte=seq)


def _message_batches(now: datetime, size: int, dry_run: bool) -> Iterator[SweepResult]:
    """Yield one result per batch of expired or acknowledged messages of live sessions.

    Batches walk the messages in (mailbox, seq) order behind a cursor, so a
    dry run, which deletes nothing, moves on like a real one. A mailbox
    another transaction holds is skipped by the walk and swept at its end.
    """
    # Expired unacknowledged messages of expired sessions are left for the
    # session step, which counts them with the session that held them.
    work = Q(acked_at__isnull=False) | Q(expires_at__lte=now, mailbox__expires_at__gt=now)
    cursor: Cursor = ("", 0)
    skipped: set[str] = set()
    while True:
        started = time.monotonic()
        with transaction.atomic():
            ahead = list(
                Message.objects.filter(work & _after(cursor))
                .order_by("mailbox_id", "seq")
                .values_list("mailbox_id", "seq")[:size]
            )
            if not ahead:
                break
            end: Cursor = ahead[-1]
            wanted = {box for box, _ in ahead}
            boxes = _lock(wanted, dry_run, skip_locked=True)
            skipped |= wanted - boxes.keys()
            rows = list(
                Message.objects.filter(work & _after(cursor) & _up_to(end))
                .filter(mailbox_id__in=list(boxes))
                .order_by("mailbox_id", "seq")
                .values_list(*ROW)[:size]
            )
            result = _drop_rows(boxes, rows, dry_run)
        # A batch cut short by rows acknowledged since the look-ahead resumes
        # after its last row; otherwise after the look-ahead's last row.
        cursor = (rows[-1][1], rows[-1][2]) if len(rows) == size else end
        logger.debug(
            "swept messages",
            extra={"rows": len(rows), "mailboxes": len(boxes), "ms": _ms(started)},
        )
        yield result

    # The walk never comes back behind its cursor: a mailbox it skipped
    # (another run or a request held it) is swept now, waiting for its lock,
    # so two runs that keep skipping each other leave nothing behind.
    # The set costs one id per skipped mailbox: a few, unless two runs start
    # together over millions of mailboxes and keep meeting each other.
    for session_id in sorted(skipped):
        while True:
            with transaction.atomic():
                boxes = _lock({session_id}, dry_run=False, skip_locked=False)
                rows = list(
                    Message.objects.filter(work, mailbox_id__in=list(boxes))
                    .order_by("seq")
                    .values_list(*ROW)[:size]
                )
                if not rows:
                    break
                result = _drop_rows(boxes, rows, dry_run=False)
            yield result


def _lock(session_ids: set[str], dry_run: bool, skip_locked: bool) -> dict[str, Mailbox]:
    """Return the mailboxes named, row-locked unless this is a dry run.

    With `skip_locked`, a mailbox another transaction holds is left out
    rather than waited for (PostgreSQL). SQLite has no row locks (Django
    ignores select_for_update there): the batch's write transaction already
    excludes every other writer.
    """
    query = Mailbox.objects.filter(pk__in=list(session_ids)).order_by("pk")
    if not dry_run:
        query = query.select_for_update(skip_locked=skip_locked)
    boxes = query.only("session_id", "queued", "lost_seq", "high_water")
    return {box.session_id: box for box in boxes}


def _drop_rows(
    boxes: dict[str, Mailbox], rows: list[tuple[Any, ...]], dry_run: bool
) -> SweepResult:
    """Delete the rows of one batch and bring each mailbox's counters along."""
    result = SweepResult()
    unread: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        if row[5] is not None:
            result.acked += 1
        else:
            unread.setdefault(row[1], []).append(row)

    for session_id, dropped in unread.items():
        durable = [r for r in dropped if r[3]]
        ephemeral = [r for r in dropped if not r[3]]
        result.ttl += len(durable)
        result.transport_closed += len(ephemeral)
        if dry_run:
            continue
        box = boxes[session_id]
        box.queued -= len(dropped)
        if durable:
            box.lost_seq = max(box.lost_seq, max(r[2] for r in durable))
        for reason, group in ((DROP_TTL, durable), (DROP_TRANSPORT_CLOSED, ephemeral)):
            _count_drop(session_id, reason, len(group), {r[4] for r in group})
        _drain_if_empty(box, had=len(dropped))
        box.save(update_fields=["queued", "lost_seq", "high_water"])

    if not dry_run and rows:
        Message.objects.filter(pk__in=[r[0] for r in rows]).delete()
    return result


def _count_drop(session_id: str, reason: str, count: int, types: set[str]) -> None:
    if count:
        _on_commit(
            _send,
            signal=signals.messages_dropped,
            session_id=session_id,
            reason=reason,
            count=count,
            message_type=next(iter(types)) if len(types) == 1 else None,
        )


def _session_batches(now: datetime, size: int, dry_run: bool) -> Iterator[SweepResult]:
    """Yield one result per batch of expired sessions removed with their mailboxes."""
    per_batch = max(1, size // SESSIONS_PER_ROW_BATCH)
    expired = Mailbox.objects.filter(expires_at__lte=now).order_by("session_id")
    cursor = ""
    skipped: list[str] = []
    while True:
        started = time.monotonic()
        with transaction.atomic():
            wanted = list(
                expired.filter(session_id__gt=cursor).values_list("pk", flat=True)[:per_batch]
            )
            if not wanted:
                break
            query = expired.filter(pk__in=wanted)
            if not dry_run:
                query = query.select_for_update(skip_locked=True)
            boxes = list(query.only("session_id", "high_water"))
            locked = {box.session_id for box in boxes}
            skipped.extend(pk for pk in wanted if pk not in locked)
            result = _remove_sessions(boxes, dry_run)
        cursor = wanted[-1]
        logger.debug("removed sessions", extra={"sessions": len(boxes), "ms": _ms(started)})
        yield result

    # As for messages: what the walk skipped is taken now, waiting for locks.
    for i in range(0, len(skipped), per_batch):
        with transaction.atomic():
            query = expired.filter(pk__in=skipped[i : i + per_batch]).select_for_update()
            boxes = list(query.only("session_id", "high_water"))
            result = _remove_sessions(boxes, dry_run=False)
        if boxes:
            yield result


def _remove_sessions(boxes: list[Mailbox], dry_run: bool) -> SweepResult:
    """Count what the locked expired sessions still held, then delete them."""
    ids = [box.session_id for box in boxes]
    held = (
        Message.objects.filter(mailbox_id__in=ids, acked_at__isnull=True)
        .values("mailbox_id", "durable")
        .annotate(n=Count("pk"), first=Min("message_type"), last=Max("message_type"))
    )
    result = SweepResult(sessions=len(boxes))
    queued: dict[str, int] = {}
    for group in held:
        session_id, n = group["mailbox_id"], group["n"]
        queued[session_id] = queued.get(session_id, 0) + n
        reason = DROP_TTL if group["durable"] else DROP_TRANSPORT_CLOSED
        if reason == DROP_TTL:
            result.ttl += n
        else:
            result.transport_closed += n
        if not dry_run:
            types = {group["first"], group["last"]}
            _count_drop(session_id, reason, n, types)
    if dry_run:
        return result

    for box in boxes:
        if box.high_water:
            _on_commit(
                _send,
                signal=signals.mailbox_drained,
                session_id=box.session_id,
                high_water=box.high_water,
            )
        _on_commit(
            _send,
            signal=signals.session_expired,
            session_id=box.session_id,
            count=queued.get(box.session_id, 0),
        )
    Message.objects.filter(mailbox_id__in=ids).delete()
    Mailbox.objects.filter(pk__in=ids).delete()
    return result


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
