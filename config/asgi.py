"""ASGI entry point: HTTP through Django, WebSockets through the transport."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from telemetry.multiproc import clear_stale_at_start  # noqa: E402
from transport.http import APIHandler, split  # noqa: E402
from transport.origins import AllowedOrigins  # noqa: E402
from transport.routing import websocket_urlpatterns  # noqa: E402
from transport.worker import WORKER_CHANNEL, WorkerConsumer  # noqa: E402

# Servers and workers load this module; one-off commands (cron) do not.
clear_stale_at_start()

application = ProtocolTypeRouter(
    {
        # Daphne serves no files: /static/ (the browser client, the admin's
        # assets) comes from the apps' static folders, no collectstatic step.
        # The REST API runs through a short, all-async middleware chain.
        "http": split(ASGIStaticFilesHandler(django_asgi_app), APIHandler()),
        # Browsers' pages from other sites are refused (403); clients that
        # send no Origin are not browsers and pass (transport.origins).
        "websocket": AllowedOrigins(URLRouter(websocket_urlpatterns)),
        # `manage.py runworker transport-worker` serves this channel.
        "channel": ChannelNameRouter({WORKER_CHANNEL: WorkerConsumer.as_asgi()}),
    }
)
