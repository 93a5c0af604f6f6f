"""Publish the plan's events to StatsD when STATSD_HOST is set.

Each event is one UDP datagram on a non-blocking socket: a StatsD server
that is down, slow or unreachable costs a failed sendto() and nothing more.
The host name is resolved once, when the first event is published; a name
that does not resolve turns publishing off for the process, with a warning.

Sessions and queues are gauges of the database, not events: a thread of
each process reads them every STATSD_GAUGE_INTERVAL seconds and publishes
them, as the Prometheus collector reads them at each scrape.
"""

import functools
import logging
import re
import threading

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from statsd import StatsClient

from telemetry import collector

logger = logging.getLogger(__name__)

# StatsD separates a name from its value with ':' and its type with '|', and
# the client sends ASCII: anything else in a label value becomes '_'. Dots
# would nest an action name like `cart.add` one level deeper, so they go too.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")

_client: StatsClient | None = None
_resolved = False
_lock = threading.Lock()


def part(value: str) -> str:
    """Return a label value made safe as one segment of a StatsD name."""
    return _UNSAFE.sub("_", value) or "_"


def client() -> StatsClient | None:
    """Return the process's StatsD client, or None when publishing is off."""
    global _client, _resolved
    if _resolved:
        return _client
    with _lock:
        if not _resolved:
            _client = _connect()
            _resolved = True
    return _client


def _connect() -> StatsClient | None:
    if not settings.STATSD_HOST:
        return None
    try:
        publisher = StatsClient(
            settings.STATSD_HOST, settings.STATSD_PORT, prefix=settings.STATSD_PREFIX or None
        )
    except OSError:
        logger.warning("StatsD host does not resolve; not publishing", exc_info=True)
        return None
    publisher._sock.setblocking(False)
    return publisher


def reset() -> None:
    """Forget the client, so the next event reads settings again (tests)."""
    global _client, _resolved
    with _lock:
        if _client is not None:
            _client.close()
        _client, _resolved = None, False


@functools.lru_cache(maxsize=1024)
def _named(name: str, labels: tuple[str, ...]) -> str:
    # Label values come from small fixed sets (transports, registered
    # actions, reasons), so each name is made once.
    return ".".join([name, *(part(label) for label in labels)])


def incr(name: str, *labels: str, count: int = 1) -> None:
    """Count an event, named by `name` and its label values (made safe here)."""
    if (c := client()) is not None:
        c.incr(_named(name, labels), count)


def gauge(name: str, value: float, *labels: str) -> None:
    if (c := client()) is not None:
        c.gauge(_named(name, labels), value)


def timing(name: str, ms: float, *labels: str) -> None:
    if (c := client()) is not None:
        c.timing(_named(name, labels), ms)


def publish_database_gauges() -> None:
    """Publish the live sessions per transport and the messages queued in all mailboxes."""
    for transport, count in collector.session_counts().items():
        gauge("session_active", count, transport)
    gauge("mailbox_messages_queued._total", collector.queued_total())


class GaugePublisher(threading.Thread):
    """Publish the database gauges every `interval` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="statsd-gauges", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(self.interval):
            try:
                publish_database_gauges()
                failing = False
            except DatabaseError:
                # One warning per outage, not one per interval.
                if not failing:
                    logger.warning("StatsD gauges not read from the database", exc_info=True)
                failing = True
            finally:
                # This thread's own connection: not held open between rounds.
                connection.close()

    def stop(self) -> None:
        self.stopped.set()


_publisher: GaugePublisher | None = None


def start_gauges() -> None:
    """Start this process's gauge publisher, when StatsD and an interval are set."""
    global _publisher
    if not settings.STATSD_HOST or settings.STATSD_GAUGE_INTERVAL <= 0:
        return
    if _publisher is None or not _publisher.is_alive():
        _publisher = GaugePublisher(settings.STATSD_GAUGE_INTERVAL)
        _publisher.start()
