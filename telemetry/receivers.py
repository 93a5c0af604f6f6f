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
from telemetry.metrics import series
from transport import signals as transport_signals

logger = logging.getLogger("transport.events")


# --- sessions ---------------------------------------------------------------


def _session_opened(sender: Any, session_id: str, transport: str, **kw: Any) -> None:
    statsd.incr("session.opened", transport)
    logger.info("session connected", extra={"session_id": session_id, "transport": transport})


def _session_closed(sender: Any, session_id: str, transport: str, **kw: Any) -> None:
    statsd.incr("session.closed", transport)
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
    series(metrics.mailbox_enqueue, source).inc()
    statsd.incr("mailbox_enqueue", source)
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
    series(metrics.mailbox_delivery, transport).inc(len(messages))
    statsd.incr("mailbox_delivery", transport, count=len(messages))
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
    statsd.incr("mailbox_drop", reason, count=count)
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
    series(metrics.inbound_actions, transport, action).inc()
    statsd.incr("inbound_actions", transport, action)
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
    series(metrics.dispatch_latency_ms, transport, action).observe(duration_ms)
    statsd.timing("dispatch_latency", duration_ms, transport, action)


def _poll_completed(
    sender: Any, session_id: str, outcome: str, duration_ms: float, **kw: Any
) -> None:
    series(metrics.poll_duration_ms, outcome).observe(duration_ms)
    statsd.timing("poll_duration", duration_ms, outcome)


def _rate_limited(sender: Any, transport: str, network: str, retry_after: int, **kw: Any) -> None:
    bucket = metrics.ip_bucket(network)
    metrics.rate_limit_trigger.labels(transport, bucket).inc()
    statsd.incr("rate_limit_trigger", transport, bucket)
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
    series(metrics.outbound_payload_bytes, transport).observe(size)
    statsd.incr("outbound_payload_bytes", transport, count=size)


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
