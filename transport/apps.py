from django.apps import AppConfig


class TransportConfig(AppConfig):
    name = "transport"
    verbose_name = "Transport"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Import every installed app's `actions` module, registering its handlers."""
        from transport import registry

        registry.autodiscover()
