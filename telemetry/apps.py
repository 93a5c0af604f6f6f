from django.apps import AppConfig


class TelemetryConfig(AppConfig):
    name = "telemetry"
    verbose_name = "Telemetry"

    def ready(self) -> None:
        """Wire tracing, metrics, StatsD and logs to the transport's signals.

        Runs after the transport app's ready(), so the registered actions
        are known and their series can start at zero.
        """
        from django.conf import settings
        from django_structlog import signals as structlog_signals

        from telemetry import collector, metrics, receivers, statsd, tracing
        from transport import registry

        if not settings.TRANSPORT_TELEMETRY:
            return

        tracing.setup()
        receivers.connect()
        metrics.create_known_series(registry.names())
        collector.register()
        structlog_signals.bind_extra_request_metadata.connect(
            tracing.bind_request_ids, dispatch_uid="telemetry.request_ids"
        )
        statsd.gauge("mailbox_capacity_sessions", settings.TRANSPORT_MAILBOX_SESSIONS_CAPACITY)
        statsd.start_gauges()
