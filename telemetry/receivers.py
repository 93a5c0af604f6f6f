"""The one place where transport and mailbox signals become telemetry."""

import logging
from typing import Any

from mailbox import signals as mailbox_signals
from transport import signals as transport_signals

logger = logging.getLogger("transport.events")


def _dropped(sender: Any, session_id: str, reason: str, count: int, **kw: Any) -> None:
    logger.warning(
        "messages dropped",
        extra={"session_id": session_id, "reason": reason, "count": count},
    )


def _rate_limited(sender: Any, transport: str, network: str, retry_after: int, **kw: Any) -> None:
    logger.warning(
        "rate limited",
        extra={"transport": transport, "network": network, "retry_after": retry_after},
    )


def connect() -> None:
    """Connect every receiver (idempotent: receivers are connected by uid)."""
    mailbox_signals.messages_dropped.connect(_dropped, dispatch_uid="telemetry.dropped")
    transport_signals.rate_limited.connect(_rate_limited, dispatch_uid="telemetry.rate_limited")
