"""Read /metrics the way Prometheus does, and pick samples out of it."""

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Every family of the telemetry plan, by its exposed name and type.
FAMILIES = {
    "transport_session_active_total": "gauge",
    "transport_mailbox_messages_queued": "gauge",
    "transport_mailbox_messages_queued_high_water": "histogram",
    "transport_mailbox_enqueue": "counter",
    "transport_mailbox_delivery": "counter",
    "transport_mailbox_drop": "counter",
    "transport_inbound_actions": "counter",
    "transport_outbound_payload_bytes": "histogram",
    "transport_dispatch_latency_ms": "histogram",
    "transport_poll_duration_ms": "histogram",
    "transport_rate_limit_trigger": "counter",
    "transport_mailbox_capacity_sessions": "gauge",
}


@dataclass
class Scrape:
    """One /metrics page: family types, and every sample by name and labels."""

    types: dict[str, str]
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """Return a sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def series(self, name: str) -> list[dict[str, str]]:
        """Return the label sets of every sample of `name`."""
        return [dict(labels) for sample, labels in self.samples if sample == name]


def parse(text: str) -> Scrape:
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(types, samples)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """Return how much a sample grew between two scrapes."""
    return after.value(name, **labels) - before.value(name, **labels)
