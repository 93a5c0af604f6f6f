"""The figures of the admin's overview page, read from the database and this process's metrics.

Nothing here asks the Prometheus server: the page must load when
Prometheus is down, which is when an operator needs it most.
"""

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from mailbox.models import Mailbox, Message
from mailbox.store import DROP_OVERFLOW, DROP_TRANSPORT_CLOSED, DROP_TTL

logger = logging.getLogger(__name__)

TRANSPORTS = ("ws", "rest", "mailbox")
DROP_REASONS = (DROP_TTL, DROP_OVERFLOW, DROP_TRANSPORT_CLOSED)
DROP_SAMPLE = "transport_mailbox_drop_total"

# Queue depth buckets of the chart: (label, lowest depth, highest depth).
DEPTH_BUCKETS = (
    ("0", 0, 0),
    ("1–9", 1, 9),
    ("10–99", 10, 99),
    ("100–999", 100, 999),
    ("1000+", 1000, None),
)

# Size of the inline SVG chart, in CSS pixels.
CHART_WIDTH = 420
CHART_HEIGHT = 140
CHART_LABEL = 18


def transport_q(transport: str, now: datetime) -> Q:
    """Return the filter of sessions on `transport` now, as store.transport_of decides."""
    ws = Q(ws_connections__gt=0, ws_until__gt=now)
    rest = Q(rest_until__gt=now)
    if transport == "ws":
        return ws
    if transport == "rest":
        return rest & ~ws
    if transport == "mailbox":
        return ~ws & ~rest
    raise ValueError(f"unknown transport {transport!r}")


def with_oldest(query: QuerySet[Mailbox]) -> QuerySet[Mailbox]:
    """Annotate each mailbox with `oldest_sent`, the sent time of its oldest queued message.

    A correlated subquery rides the queue's (mailbox, seq) index of unacked
    messages: one probe per mailbox of the page, inside the page's one query.
    """
    oldest = (
        Message.objects.filter(mailbox=OuterRef("pk"), acked_at__isnull=True)
        .order_by("seq")
        .values("sent_at")[:1]
    )
    return query.annotate(oldest_sent=Subquery(oldest))


def age(since: datetime | None, now: datetime) -> str:
    """Return a short age like `3 d 4 h`, `12 min` or `40 s`; a dash when unset."""
    if since is None:
        return "—"
    seconds = max(0, int((now - since).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{seconds} s"


@dataclass
class Bar:
    label: str
    count: int
    x: int
    y: int
    width: int
    height: int


def depth_chart(counts: list[tuple[str, int]]) -> list[Bar]:
    """Lay out one bar per depth bucket; the tallest fills the chart."""
    top = max((n for _, n in counts), default=0) or 1
    slot = CHART_WIDTH // max(1, len(counts))
    usable = CHART_HEIGHT - 2 * CHART_LABEL
    bars = []
    for i, (label, n) in enumerate(counts):
        height = round(usable * n / top) if n else 0
        y = CHART_HEIGHT - CHART_LABEL - height
        bars.append(Bar(label, n, i * slot + 6, y, slot - 12, height))
    return bars


def drops_by_reason() -> dict[str, int | None]:
    """Return the drop counters this process can see, None where it sees none.

    With PROMETHEUS_MULTIPROC_DIR set, the files of every process on this
    host are summed, as /metrics does; otherwise this process's registry is
    read. A metric not registered yet reads as None, never as an error.
    """
    found: dict[str, int | None] = dict.fromkeys(DROP_REASONS)
    try:
        for sample in _drop_samples():
            reason = sample.labels.get("reason")
            if sample.name == DROP_SAMPLE and reason in found:
                found[reason] = (found[reason] or 0) + int(sample.value)
    except Exception:
        logger.warning("drop counters unreadable", exc_info=True)
    return found


def _drop_samples() -> list[Any]:
    import prometheus_client
    from prometheus_client import multiprocess

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        collectors: list[Any] = [multiprocess.MultiProcessCollector(None, path=path)]
    else:
        # Only the drop counter's collector: collecting the whole registry
        # would also run the gauges computed from the database.
        names = getattr(prometheus_client.REGISTRY, "_names_to_collectors", {})
        collectors = [names[DROP_SAMPLE]] if DROP_SAMPLE in names else []
    return [s for c in collectors for family in c.collect() for s in family.samples]


def overview(now: datetime | None = None) -> dict[str, Any]:
    """Gather every figure of the overview page, in a handful of queries."""
    now = now or timezone.now()
    live = Mailbox.objects.filter(expires_at__gt=now)

    counts = live.aggregate(
        sessions=Count("pk"),
        total_queued=Sum("queued"),
        **{t: Count("pk", filter=transport_q(t, now)) for t in TRANSPORTS},
        **{
            f"depth_{i}": Count("pk", filter=_depth_q(low, high))
            for i, (_, low, high) in enumerate(DEPTH_BUCKETS)
        },
    )
    depths = [(label, counts[f"depth_{i}"]) for i, (label, _, _) in enumerate(DEPTH_BUCKETS)]

    queued = live.filter(queued__gt=0)
    deepest = list(with_oldest(queued).order_by("-queued", "pk")[:10])
    oldest = list(
        with_oldest(queued).filter(Q(oldest_sent__isnull=False)).order_by("oldest_sent", "pk")[:10]
    )
    for box in (*deepest, *oldest):
        box.age = age(box.oldest_sent, now)  # type: ignore[attr-defined]

    return {
        "now": now,
        "sessions": counts["sessions"],
        "by_transport": [(t, counts[t]) for t in TRANSPORTS],
        "queued": counts["total_queued"] or 0,
        "expired_sessions": Mailbox.objects.filter(expires_at__lte=now).count(),
        "expired_messages": Message.objects.filter(
            expires_at__lte=now, acked_at__isnull=True
        ).count(),
        "drops": list(drops_by_reason().items()),
        "depths": depth_chart(depths),
        "chart": {"width": CHART_WIDTH, "height": CHART_HEIGHT, "label": CHART_LABEL},
        "deepest": deepest,
        "oldest": oldest,
    }


def _depth_q(low: int, high: int | None) -> Q:
    if high is None:
        return Q(queued__gte=low)
    return Q(queued__gte=low, queued__lte=high)
