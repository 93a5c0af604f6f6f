"""The Prometheus metrics of the telemetry plan, in one place.

Names, label sets and buckets here are a contract: dashboards and alert
rules use them. Counters and histograms live in prometheus_client (and in
its multiprocess files when PROMETHEUS_MULTIPROC_DIR is set); the gauges
come from the database at scrape time (telemetry.collector), so several
processes never add up their views of the same sessions.
"""

import functools
import hashlib
import os
from typing import TypeVar

from prometheus_client import Counter, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase

# `_created` series double every counter's series in the text format and
# are absent in multiprocess mode; without them both modes expose the same.
disable_created_metrics()

# prometheus_client writes its files there from the first metric on; a
# missing directory would fail every process at startup.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

TRANSPORTS = ("ws", "rest", "mailbox")
ACTION_TRANSPORTS = ("ws", "rest")
SOURCES = ("router", "system")
DROP_REASONS = ("ttl", "overflow", "transport-closed")
POLL_OUTCOMES = ("messages", "timeout", "error")

# Rate-limited networks are hashed into this many buckets: enough to tell
# one network hammering the service from a spread-out surge, few enough to
# create them all at zero without bloating every scrape.
IP_BUCKETS = 16

# Bracket the 150 ms dispatch objective closely, then reach the action timeout.
LATENCY_MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 150, 250, 500, 1000, 2500, 5000, 10000)

# A long-poll ends at its timeout when nothing comes: the default 25 s and the
# 55 s cap get a bucket edge on each side, so the plateau shows.
POLL_MS_BUCKETS = (
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    20000,
    24000,
    26000,
    30000,
    54000,
    56000,
    60000,
    120000,
)

# From a pong frame to a full poll answer of a thousand messages.
PAYLOAD_BYTES_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576)

# Queue depths, up to ten times the default mailbox capacity.
HIGH_WATER_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

mailbox_enqueue = Counter(
    "transport_mailbox_enqueue",
    "Messages enqueued in mailboxes, by who sent them (an action handler or other code).",
    ["source"],
)
mailbox_delivery = Counter(
    "transport_mailbox_delivery",
    "Messages handed to a client, by the transport that carried them.",
    ["transport"],
)
mailbox_drop = Counter(
    "transport_mailbox_drop",
    "Messages dropped before a client acknowledged them, by reason.",
    ["reason"],
)
inbound_actions = Counter(
    "transport_inbound_actions",
    'Actions received from clients; action="unknown" for unregistered names.',
    ["transport", "action"],
)
rate_limit_trigger = Counter(
    "transport_rate_limit_trigger",
    "Requests and frames refused by the rate limiter, by a hash bucket of the client network.",
    ["transport", "ip_bucket"],
)
outbound_payload_bytes = Histogram(
    "transport_outbound_payload_bytes",
    "Serialized size of each frame or response body sent to a client, in bytes.",
    ["transport"],
    buckets=PAYLOAD_BYTES_BUCKETS,
)
dispatch_latency_ms = Histogram(
    "transport_dispatch_latency_ms",
    "Time from receiving an action to the worker's reply, in milliseconds.",
    ["transport", "action"],
    buckets=LATENCY_MS_BUCKETS,
)
poll_duration_ms = Histogram(
    "transport_poll_duration_ms",
    "Duration of each long-poll, in milliseconds, by how it ended.",
    ["outcome"],
    buckets=POLL_MS_BUCKETS,
)
mailbox_high_water = Histogram(
    "transport_mailbox_messages_queued_high_water",
    "Each mailbox's highest queue depth, observed when it drains or expires.",
    buckets=HIGH_WATER_BUCKETS,
)


def ip_bucket(network: str) -> str:
    """Return the bounded label of a client network: never the address itself.

    blake2b, not hash(): the bucket of a network must be the same in every
    process and on every host, or the series would not add up.
    """
    digest = hashlib.blake2b(network.encode(), digest_size=2).digest()
    return format(int.from_bytes(digest, "big") % IP_BUCKETS, "x")


def create_known_series(actions: list[str]) -> None:
    """Create every label value known in advance at zero, so each family shows from startup."""
    for source in SOURCES:
        mailbox_enqueue.labels(source)
    for transport in TRANSPORTS:
        mailbox_delivery.labels(transport)
    for reason in DROP_REASONS:
        mailbox_drop.labels(reason)
    for outcome in POLL_OUTCOMES:
        poll_duration_ms.labels(outcome)
    for transport in ACTION_TRANSPORTS:
        outbound_payload_bytes.labels(transport)
        for n in range(IP_BUCKETS):
            rate_limit_trigger.labels(transport, format(n, "x"))
        for action in [*actions, "unknown"]:
            inbound_actions.labels(transport, action)
            dispatch_latency_ms.labels(transport, action)


Metric = TypeVar("Metric", bound=MetricWrapperBase)


@functools.lru_cache(maxsize=4096)
def series(metric: Metric, *labels: str) -> Metric:
    """Return the series of `metric` with these label values, looked up once.

    labels() takes a lock and builds a key on every call; on the hot path
    the label values come from small fixed sets, so each series is kept.
    """
    return metric.labels(*labels)
