"""Repairs an operator applies to one mailbox from the admin.

Each runs in one transaction holding the mailbox's row lock, like every
other writer of its messages (see Mailbox), so `queued`, `acked_seq` and
`high_water` stay exact beside live traffic and a running sweep.
"""

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from mailbox import wakeup
from mailbox.models import Mailbox, Message
from mailbox.store import _on_commit


def _lock(session_id: str) -> Mailbox:
    """Return the mailbox, expired or not, holding its row lock."""
    return Mailbox.objects.select_for_update().get(session_id=session_id)


def expire_now(session_id: str, now: datetime | None = None) -> int:
    """Make a session's queued messages expire now; return how many.

    Nothing is dropped here: the next `expire_mailboxes` run (or the
    session's next fetch) drops them and counts them as `ttl`, exactly as
    if their lifetime had run out.
    """
    now = now or timezone.now()
    with transaction.atomic():
        box = _lock(session_id)
        return Message.objects.filter(
            mailbox=box, acked_at__isnull=True, expires_at__gt=now
        ).update(expires_at=now)


def purge_acknowledged(session_id: str) -> int:
    """Delete a session's acknowledged messages; return how many.

    They were delivered, so this is no drop and counts as none; `queued`
    counts only unacknowledged messages and does not change.
    """
    with transaction.atomic():
        box = _lock(session_id)
        deleted, _ = Message.objects.filter(mailbox=box, acked_at__isnull=False).delete()
        return deleted


def redeliver_from(session_id: str, seq: int, now: datetime | None = None) -> int:
    """Queue a session's acknowledged messages with seq >= `seq` again; return how many.

    Only messages not yet expired come back: an expired one would be dropped
    as `ttl` at once. The session's acknowledged cursor moves back below
    `seq`, so a client resuming from the server's cursor (a `hello` without
    `after`) receives them; a client resuming from a cursor of its own past
    `seq` does not, as the protocol lets the client own its cursor.
    """
    if seq < 1:
        raise ValueError(f"seq {seq} is not a positive integer")
    now = now or timezone.now()
    with transaction.atomic():
        box = _lock(session_id)
        count = Message.objects.filter(
            mailbox=box, seq__gte=seq, acked_at__isnull=False, expires_at__gt=now
        ).update(acked_at=None)
        if not count:
            return 0
        box.queued += count
        box.high_water = max(box.high_water, box.queued)
        box.acked_seq = min(box.acked_seq, seq - 1)
        box.save(update_fields=["queued", "high_water", "acked_seq"])
        _on_commit(wakeup.notify, session_id=session_id, seq=box.last_seq)
    return count
