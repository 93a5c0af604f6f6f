"""Action ids as idempotency keys: one run per (session, id), replies kept.

The claim is an INSERT on a unique (session, id) pair, so of two attempts
racing on any number of processes exactly one wins and runs the handler;
the other reads the winner's reply, waiting for it if it is not there yet.
"""

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from mailbox.errors import MailboxNotFound
from mailbox.loops import GroupCommit, PerLoop
from mailbox.models import Mailbox
from mailbox.store import get_live
from transport.models import ActionRecord

logger = logging.getLogger(__name__)

# How often a duplicate polls for the first attempt's reply.
_POLL_INTERVAL = 0.05


class Claim(enum.Enum):
    NEW = "new"
    DONE = "done"
    RUNNING = "running"
    # The claim asked for a live session, and there is none.
    NO_SESSION = "no_session"


@dataclass(frozen=True)
class Claimed:
    state: Claim
    reply: dict[str, Any] | None = None


def _stale_after() -> timedelta:
    """Return how long a claim may stay unanswered before it counts as abandoned.

    Past three action timeouts the attempt's worker has died (an in-process
    handler cannot outlive its server, a worker process answers or dies),
    so a retry runs the handler again rather than wait forever.
    """
    return timedelta(seconds=3 * settings.TRANSPORT_ACTION_TIMEOUT + 5)


_TABLE = ActionRecord._meta.db_table
_MAILBOXES = Mailbox._meta.db_table

# One statement in autocommit, no ORM: this runs for every action, and the
# ORM's model instance, savepoint and compiler cost several times the
# INSERT itself. Both SQLite and PostgreSQL know ON CONFLICT DO NOTHING.
_CLAIM_SQL = (
    f"INSERT INTO {_TABLE} (session_id, action_id, action, created_at, reply) "
    "VALUES (%s, %s, %s, %s, NULL) ON CONFLICT (session_id, action_id) DO NOTHING"
)


# The same INSERT, made only while the session is live: a REST action's
# session check, in the statement the action writes anyway, instead of a
# database call (and a thread hop) of its own before it.
_CLAIM_IF_LIVE_SQL = (
    f"INSERT INTO {_TABLE} (session_id, action_id, action, created_at, reply) "
    f"SELECT %s, %s, %s, %s, NULL WHERE EXISTS (SELECT 1 FROM {_MAILBOXES} "
    "WHERE session_id = %s AND expires_at > %s) "
    "ON CONFLICT (session_id, action_id) DO NOTHING"
)


def claim(session_id: str, action_id: str, action: str) -> Claimed:
    """Claim an action id for a run, or return the state of an earlier attempt."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, [session_id, action_id, action, now])
        if cursor.rowcount == 1:
            return Claimed(Claim.NEW)
    return _claim_taken(session_id, action_id, action, now)


def _claim_taken(
    session_id: str, action_id: str, action: str, now: datetime, live: bool = False
) -> Claimed:
    """Decide about an id whose INSERT did not go in: reply, wait, or run again.

    With `live`, the session may be what kept it out: then nothing runs.
    """
    window = timedelta(seconds=settings.TRANSPORT_DEDUPE_WINDOW)
    if live:
        try:
            get_live(session_id, now)
        except MailboxNotFound:
            return Claimed(Claim.NO_SESSION)
    with transaction.atomic():
        record = (
            ActionRecord.objects.select_for_update()
            .filter(session_id=session_id, action_id=action_id)
            .first()
        )
        if record is None:
            # Removed between our INSERT and this read: claim it again.
            ActionRecord.objects.create(
                session_id=session_id, action_id=action_id, action=action, created_at=now
            )
            return Claimed(Claim.NEW)
        expired = record.created_at < now - window
        abandoned = record.reply is None and record.created_at < now - _stale_after()
        if expired or abandoned:
            record.created_at = now
            record.reply = None
            record.action = action
            record.save(update_fields=["created_at", "reply", "action"])
            return Claimed(Claim.NEW)
        if record.reply is not None:
            return Claimed(Claim.DONE, record.reply)
        return Claimed(Claim.RUNNING)


# Indexed by "is this PostgreSQL": its jsonb column takes text only by a cast.
_COMPLETE_SQL = {
    vendor_is_pg: f"UPDATE {_TABLE} SET reply = {value} WHERE session_id = %s AND action_id = %s"
    for vendor_is_pg, value in ((False, "%s"), (True, "CAST(%s AS jsonb)"))
}


def complete(session_id: str, action_id: str, reply: dict[str, Any]) -> None:
    """Store the reply of a claimed action id."""
    with connection.cursor() as cursor:
        cursor.execute(
            _COMPLETE_SQL[connection.vendor == "postgresql"],
            [json.dumps(reply), session_id, action_id],
        )


def release(session_id: str, action_id: str) -> None:
    """Drop an unanswered claim whose job never reached a worker, so a retry runs it."""
    ActionRecord.objects.filter(
        session_id=session_id, action_id=action_id, reply__isnull=True
    ).delete()


def stored_reply(session_id: str, action_id: str) -> dict[str, Any] | None:
    return (
        ActionRecord.objects.filter(session_id=session_id, action_id=action_id)
        .values_list("reply", flat=True)
        .first()
    )


arelease = database_sync_to_async(release)
_astored_reply = database_sync_to_async(stored_reply)


@dataclass(frozen=True, slots=True)
class _ClaimWrite:
    session_id: str
    action_id: str
    action: str
    live: bool  # only while the session is live


@dataclass(frozen=True, slots=True)
class _ReplyWrite:
    session_id: str
    action_id: str
    reply: dict[str, Any]


async def _write(items: list[_ClaimWrite | _ReplyWrite]) -> list[Claimed | None]:
    """Write a group commit of claims and replies; each claim gets its state.

    Every action costs a claim and a reply: two thread hops and two commits
    if each went alone.
    """
    claims = [item for item in items if isinstance(item, _ClaimWrite)]
    replies = [item for item in items if isinstance(item, _ReplyWrite)]
    try:
        claimed = iter(await _write_batch(claims, replies))
    except Exception:
        if replies:
            # Their actions were answered; a retry of one waits for the
            # reply, then runs it again once the claim is stale.
            logger.warning("action replies not stored", extra={"count": len(replies)})
        raise
    return [next(claimed) if isinstance(item, _ClaimWrite) else None for item in items]


_writes = PerLoop(lambda: GroupCommit(_write))


@database_sync_to_async
def _write_batch(claims: list[_ClaimWrite], replies: list[_ReplyWrite]) -> list[Claimed]:
    """Store replies, then try the claims, in one transaction.

    Replies go first, so a retry claimed in the same batch as its first
    attempt's reply already finds the reply.
    """
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cursor:
        _purge_if_due(cursor, now)
        if replies:
            cursor.executemany(
                _COMPLETE_SQL[connection.vendor == "postgresql"],
                [(json.dumps(r.reply), r.session_id, r.action_id) for r in replies],
            )
        statements = [
            (_CLAIM_IF_LIVE_SQL, [c.session_id, c.action_id, c.action, now, c.session_id, now])
            if c.live
            else (_CLAIM_SQL, [c.session_id, c.action_id, c.action, now])
            for c in claims
        ]
        won = [count == 1 for count in _execute_each(cursor, statements)]
    return [
        Claimed(Claim.NEW)
        if new
        else _claim_taken(c.session_id, c.action_id, c.action, now, c.live)
        for c, new in zip(claims, won, strict=True)
    ]


def _execute_each(cursor: Any, statements: list[tuple[str, list[Any]]]) -> list[int]:
    """Run statements one by one through the project's engines' fast path; return rowcounts.

    Through Django's cursor, a claim's INSERT cost more CPU than SQLite's
    work on it (telemetry.backends.measured); an engine without the fast
    path runs them one by one as usual.
    """
    if hasattr(cursor.cursor, "execute_each"):
        with connection.wrap_database_errors:
            counted: list[int] = cursor.cursor.execute_each(statements)
            return counted
    counts = []
    for sql, params in statements:
        cursor.execute(sql, params)
        counts.append(cursor.rowcount)
    return counts


# Records older than the dedupe window are garbage; each process deletes a
# bounded slice of them at most this often, inside a batch it writes anyway.
PURGE_INTERVAL = 60.0
PURGE_LIMIT = 5000
_last_purge = 0.0


def _purge_if_due(cursor: Any, now: datetime) -> None:
    global _last_purge
    if time.monotonic() - _last_purge < PURGE_INTERVAL:
        return
    _last_purge = time.monotonic()
    cutoff = now - timedelta(seconds=settings.TRANSPORT_DEDUPE_WINDOW)
    cursor.execute(
        f"DELETE FROM {_TABLE} WHERE id IN "
        f"(SELECT id FROM {_TABLE} WHERE created_at < %s LIMIT {PURGE_LIMIT})",
        [cutoff],
    )


async def aclaim(session_id: str, action_id: str, action: str, live: bool = False) -> Claimed:
    """Claim an action id (batched with other claims and replies of this process).

    With `live`, only while the session is live; NO_SESSION otherwise.
    """
    claimed = await _writes.get().put(_ClaimWrite(session_id, action_id, action, live))
    assert claimed is not None
    return claimed


def complete_later(session_id: str, action_id: str, reply: dict[str, Any]) -> None:
    """Store an action's reply in this process's next group commit, without waiting for it.

    The reply goes to the client meanwhile. Storing it first would not
    narrow any window: a server that dies before the write loses the reply
    either way, and a retry arriving before it waits for it.
    """
    _writes.get().put_nowait(_ReplyWrite(session_id, action_id, reply))


async def wait_for_reply(session_id: str, action_id: str, timeout: float) -> dict[str, Any] | None:
    """Wait up to `timeout` for another attempt's reply; None if none came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        reply = await _astored_reply(session_id, action_id)
        if reply is not None:
            return reply
        await asyncio.sleep(_POLL_INTERVAL)
    return None
