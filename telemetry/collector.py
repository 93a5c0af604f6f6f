"""Gauges computed from the database at scrape time, and the /metrics view.

Sessions and queues live in the database, which every server process
shares: a gauge kept in each process's memory would count a session once
per process that saw it, and keep a killed process's value. Reading the
database when Prometheus scrapes is exact, and costs two queries per scrape
instead of work on every event.
"""

import logging
import os
from collections.abc import Iterable, Iterator

import prometheus_client
from django.conf import settings
from django.db import Error as DatabaseError
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django_prometheus.exports import ExportToDjangoView
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailbox.models import Mailbox
from telemetry.metrics import TRANSPORTS

logger = logging.getLogger(__name__)

SESSIONS = "transport_session_active_total"
QUEUED = "transport_mailbox_messages_queued"
CAPACITY = "transport_mailbox_capacity_sessions"

SESSIONS_HELP = "Live sessions on each transport now (ws, rest, or mailbox when neither)."
QUEUED_HELP = (
    'Queued messages of the deepest mailboxes (top K by depth), and mailbox="_total" for all.'
)
CAPACITY_HELP = (
    "Mailbox sessions the deployment is sized for (TRANSPORT_MAILBOX_SESSIONS_CAPACITY)."
)


def session_counts() -> dict[str, int]:
    """Return the live sessions on each transport, by the rule of store.transport_of()."""
    now = timezone.now()
    ws = Q(ws_connections__gt=0, ws_until__gt=now)
    rest = Q(rest_until__gt=now) & ~ws
    row = Mailbox.objects.filter(expires_at__gt=now).aggregate(
        live=Count("pk"), ws=Count("pk", filter=ws), rest=Count("pk", filter=rest)
    )
    return {"ws": row["ws"], "rest": row["rest"], "mailbox": row["live"] - row["ws"] - row["rest"]}


def deepest_mailboxes(k: int) -> tuple[list[tuple[str, int]], int]:
    """Return the k deepest live mailboxes with their depth, and the depth of all."""
    top = list(
        _backlogged().order_by("-queued", "session_id").values_list("session_id", "queued")[:k]
    )
    return top, queued_total()


def queued_total() -> int:
    """Return the messages queued in every live mailbox."""
    return _backlogged().aggregate(total=Sum("queued"))["total"] or 0


def _backlogged() -> "QuerySet[Mailbox]":
    return Mailbox.objects.filter(expires_at__gt=timezone.now(), queued__gt=0)


class DatabaseCollector(Collector):
    """Collect the gauges of the plan from the database and settings."""

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Registration asks for names; answering from here keeps it off the database.
        return [
            GaugeMetricFamily(SESSIONS, SESSIONS_HELP, labels=["transport"]),
            GaugeMetricFamily(QUEUED, QUEUED_HELP, labels=["mailbox"]),
            GaugeMetricFamily(CAPACITY, CAPACITY_HELP),
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sessions = GaugeMetricFamily(SESSIONS, SESSIONS_HELP, labels=["transport"])
        queued = GaugeMetricFamily(QUEUED, QUEUED_HELP, labels=["mailbox"])
        try:
            counts = session_counts()
            top, total = deepest_mailboxes(settings.TRANSPORT_METRICS_TOP_K)
        except DatabaseError:
            # /readyz reports the outage; the scrape still serves the counters.
            logger.warning("database gauges unavailable", exc_info=True)
        else:
            for transport in TRANSPORTS:
                sessions.add_metric([transport], counts[transport])
            for session_id, depth in top:
                queued.add_metric([session_id], depth)
            queued.add_metric(["_total"], total)
        capacity = GaugeMetricFamily(CAPACITY, CAPACITY_HELP)
        capacity.add_metric([], settings.TRANSPORT_MAILBOX_SESSIONS_CAPACITY)
        yield from (sessions, queued, capacity)


database_collector = DatabaseCollector()


def multiprocess_dir() -> str | None:
    """Return the multiprocess directory, or None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def register() -> None:
    """Serve the database gauges from the default registry (single-process mode)."""
    if multiprocess_dir() is None and database_collector not in _registered():
        prometheus_client.REGISTRY.register(database_collector)


def _registered() -> Iterable[Collector]:
    return list(prometheus_client.REGISTRY._collector_to_names)


def metrics(request: HttpRequest) -> HttpResponse:
    """Serve /metrics: django-prometheus's view, plus the database gauges.

    In multiprocess mode django-prometheus builds a fresh registry holding
    only the files' collector, so this view builds the same registry with
    the database collector added; otherwise its view serves the default
    registry, where register() put the collector.
    """
    if multiprocess_dir() is None:
        return ExportToDjangoView(request)
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(database_collector)
    body = prometheus_client.generate_latest(registry)
    return HttpResponse(body, content_type=prometheus_client.CONTENT_TYPE_LATEST)
