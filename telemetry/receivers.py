"""The one place where transport and mailbox signals become telemetry.

Each receiver updates in-memory metrics, sends at most a few UDP datagrams
and maybe writes a log line: nothing here touches the database, so a
signal costs microseconds on the hot path. Gauges are read from the
database at scrape time instead (telemetry.collector).
"""

import logging
from collections.abc import Callable
from typing import Any

from django.dispatch import Signal

from mailbox import signals as mailbox_signals
from telemetry import metrics, statsd
from telemetry.statsd import part
from transport import signals as transport_signals

logger = logging.getLogger("transport.events")


# --- sessions ---------------------------------------------------------------


def _session_opened(sender: Any, session_id: str, transport: str, **kw: Any) -> None:
    statsd.incr(f"session.opened.{part(transport)}")
    logger.info("session connected", extra={"session_id": session_id, "transport": transport})


def _session_closed(sender: Any, session_id: str, transport: str, **kw: Any) -> None:
    statsd.incr(f"session.closed.{part(transport)}")
    logger.info("session disconnected", extra={"session_id": session_id, "transport": transport})


def _session_created(sender: Any, session_id: str, **kw: Any) -> None:
    statsd.incr("session.created")


def _session_expired(sender: Any, session_id: str, count: int = 0, **kw: Any) -> None:
    statsd.incr("session.expired")
    logger.info("session expired", extra={"session_id": session_id, "count": count})


# --- mailbox ----------------------------------------------------------------


def _enqueued(
    sender: Any,
    session_id: str,
    message_type: str,
    source: str,
    seq: int | None = None,
    payload: Any = None,
    **kw: Any,
) -> None:
    metrics.mailbox_enqueue.labels(source).inc()
    statsd.incr(f"mailbox_enqueue.{part(source)}")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "message enqueued",
            extra={
                "session_id": session_id,
                "message_type": message_type,
                "seq": seq,
                "source": source,
                "payload": payload,
            },
        )


def _delivered(
    sender: Any, session_id: str, transport: str, messages: list[tuple[int, str]], **kw: Any
) -> None:
    metrics.mailbox_delivery.labels(transport).inc(len(messages))
    statsd.incr(f"mailbox_delivery.{part(transport)}", len(messages))
    if logger.isEnabledFor(logging.DEBUG):
        for seq, message_type in messages:
            logger.debug(
                "message delivered",
                extra={
                    "session_id": session_id,
                    "transport": transport,
                    "message_type": message_type,
                    "seq": seq,
                },
            )


def _dropped(
    sender: Any,
    session_id: str,
    reason: str,
    count: int,
    message_type: str | None = None,
    **kw: Any,
) -> None:
    metrics.mailbox_drop.labels(reason).inc(count)
    statsd.incr(f"mailbox_drop.{part(reason)}", count)
    logger.warning(
        "messages dropped",
        extra={
            "session_id": session_id,
            "reason": reason,
            "count": count,
            "message_type": message_type,
        },
    )


def _drained(sender: Any, session_id: str, high_water: int, **kw: Any) -> None:
    metrics.mailbox_high_water.observe(high_water)
    statsd.gauge("mailbox_messages_queued_high_water", high_water)


# --- transport --------------------------------------------------------------


def _action_received(
    sender: Any, session_id: str, transport: str, action: str, payload: Any = None, **kw: Any
) -> None:
    metrics.inbound_actions.labels(transport, action).inc()
    statsd.incr(f"inbound_actions.{part(transport)}.{part(action)}")
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "action received",
            extra={
                "session_id": session_id,
                "transport": transport,
                "action": action,
                "payload": payload,
            },
        )


def _action_answered(
    sender: Any,
    session_id: str,
    transport: str,
    action: str,
    ok: bool,
    duration_ms: float,
    **kw: Any,
) -> None:
    metrics.dispatch_latency_ms.labels(transport, action).observe(duration_ms)
    statsd.timing(f"dispatch_latency.{part(transport)}.{part(action)}", duration_ms)


def _poll_completed(
    sender: Any, session_id: str, outcome: str, duration_ms: float, **kw: Any
) -> None:
    metrics.poll_duration_ms.labels(outcome).observe(duration_ms)
    statsd.timing(f"poll_duration.{part(outcome)}", duration_ms)


def _rate_limited(sender: Any, transport: str, network: str, retry_after: int, **kw: Any) -> None:
    bucket = metrics.ip_bucket(network)
    metrics.rate_limit_trigger.labels(transport, bucket).inc()
    statsd.incr(f"rate_limit_trigger.{part(transport)}.{bucket}")
    # The network prefix, not the address, and only in the log line: the
    # metric's label is the bounded bucket.
    logger.warning(
        "rate limited",
        extra={
            "transport": transport,
            "network": network,
            "ip_bucket": bucket,
            "retry_after": retry_after,
        },
    )


def _payload_sent(sender: Any, transport: str, size: int, **kw: Any) -> None:
    metrics.outbound_payload_bytes.labels(transport).observe(size)
    statsd.incr(f"outbound_payload_bytes.{part(transport)}", size)


_RECEIVERS: list[tuple[Signal, Callable[..., None]]] = [
    (transport_signals.session_opened, _session_opened),
    (transport_signals.session_closed, _session_closed),
    (transport_signals.action_received, _action_received),
    (transport_signals.action_answered, _action_answered),
    (transport_signals.poll_completed, _poll_completed),
    (transport_signals.rate_limited, _rate_limited),
    (transport_signals.payload_sent, _payload_sent),
    (mailbox_signals.session_created, _session_created),
    (mailbox_signals.session_expired, _session_expired),
    (mailbox_signals.message_enqueued, _enqueued),
    (mailbox_signals.messages_delivered, _delivered),
    (mailbox_signals.messages_dropped, _dropped),
    (mailbox_signals.mailbox_drained, _drained),
]


def connect() -> None:
    """Connect every receiver (idempotent: receivers are connected by uid)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, dispatch_uid=f"telemetry.{receiver.__name__}")
