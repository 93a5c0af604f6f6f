"""The server-side API: deliver to, fetch from and acknowledge a mailbox.

    from mailbox.api import deliver
    deliver(session_id, "order.shipped", {"order": 42})
    deliver(session_id, "typing", {"user": 7}, durable=False)

Sync functions for views, signals and tasks; `a`-prefixed twins for async
code. Errors: MailboxNotFound, InvalidMessage (both in mailbox.errors).
"""

import contextvars
from typing import Any

from mailbox import store
from mailbox.errors import InvalidMessage, MailboxNotFound
from mailbox.loops import shared_hop
from mailbox.store import Batch, StoredMessage

__all__ = [
    "Batch",
    "InvalidMessage",
    "MailboxNotFound",
    "StoredMessage",
    "ack",
    "aack",
    "adeliver",
    "afetch",
    "deliver",
    "fetch",
    "source_context",
]

# Messages enqueued while an action handler runs count as `router`; the
# router sets this around the handler, everything else counts as `system`.
source_context: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mailbox_source", default="system"
)


def deliver(
    session_id: str,
    message_type: str,
    payload: Any,
    *,
    durable: bool = True,
    ttl: int | None = None,
    source: str | None = None,
) -> int | None:
    """Queue a message for a session and wake its live transport.

    `payload` is any JSON-serialisable value. `ttl` overrides
    TRANSPORT_MESSAGE_TTL. `source` defaults to `router` inside an action
    handler and `system` elsewhere. Returns the seq, or None when the
    message was dropped (ephemeral with nobody listening, or a full
    mailbox under `reject-new`).
    """
    return store.deliver(
        session_id,
        message_type,
        payload,
        durable=durable,
        ttl=ttl,
        source=source or source_context.get(),
    )


def fetch(session_id: str, after: int = 0, limit: int = 100, transport: str = "mailbox") -> Batch:
    """Acknowledge up to `after` and return the queued messages past it."""
    return store.fetch(session_id, after, limit, transport)


def ack(session_id: str, seq: int) -> None:
    """Acknowledge every message of the session with seq <= `seq`."""
    store.ack(session_id, seq)


# Async twins: calls made meanwhile share one hop to the database thread,
# each still its own transaction, in its caller's context (mailbox.loops).
adeliver = shared_hop(deliver)
afetch = shared_hop(fetch)
aack = shared_hop(ack)
