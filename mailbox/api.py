"""The server-side API: deliver to, fetch from and acknowledge a mailbox.

    from mailbox.api import deliver
    deliver(session_id, "order.shipped", {"order": 42})
    deliver(session_id, "typing", {"user": 7}, durable=False)

Sync functions for views, signals and tasks; `a`-prefixed twins for async
code. Errors: MailboxNotFound, InvalidMessage (both in mailbox.errors).
"""

import contextvars
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async

from mailbox import store
from mailbox.errors import InvalidMessage, MailboxNotFound
from mailbox.loops import GroupCommit, PerLoop
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


async def adeliver(
    session_id: str,
    message_type: str,
    payload: Any,
    *,
    durable: bool = True,
    ttl: int | None = None,
    source: str | None = None,
) -> int | None:
    """deliver() for async code; deliveries queued meanwhile share one thread hop.

    Each is still its own transaction, run in its caller's context (its
    span, its log fields), so one failing leaves the others alone.
    """
    delivery = _Delivery(
        contextvars.copy_context(),
        session_id,
        message_type,
        payload,
        durable,
        ttl,
        source or source_context.get(),
    )
    outcome = await _deliveries.get().put(delivery)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


@dataclass(frozen=True, slots=True)
class _Delivery:
    context: contextvars.Context
    session_id: str
    message_type: str
    payload: Any
    durable: bool
    ttl: int | None
    source: str

    def run(self) -> int | None:
        return store.deliver(
            self.session_id,
            self.message_type,
            self.payload,
            durable=self.durable,
            ttl=self.ttl,
            source=self.source,
        )


@database_sync_to_async
def _deliver_all(deliveries: list[_Delivery]) -> list[int | None | Exception]:
    """Run queued deliveries on the database thread; each gets its seq or its error."""
    outcomes: list[int | None | Exception] = []
    for delivery in deliveries:
        try:
            outcomes.append(delivery.context.run(delivery.run))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


# A deliver costs a thread hop as well as its transaction; the hop costs
# more. Async callers at once (action handlers, the router's late replies)
# now share it.
_deliveries = PerLoop(lambda: GroupCommit(_deliver_all))

afetch = database_sync_to_async(fetch)
aack = database_sync_to_async(ack)
