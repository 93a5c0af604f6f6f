from django.apps import AppConfig


class TelemetryConfig(AppConfig):
    name = "telemetry"
    verbose_name = "Telemetry"

    def ready(self) -> None:
        """Connect the receivers that turn transport and mailbox signals into telemetry."""
        from telemetry import receivers

        receivers.connect()
