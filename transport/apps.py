from django.apps import AppConfig


class TransportConfig(AppConfig):
    name = "transport"
    verbose_name = "Transport"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register every app's action handlers and scope Django's connection upkeep."""
        from transport import connections, registry

        registry.autodiscover()
        connections.install()
