"""Serve the application with daphne or uvicorn, configured from settings."""

import logging
import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Serve HTTP and WebSockets with daphne (default) or uvicorn on HOST:PORT, "
        "with the frame size limit and keepalive pings of the transport settings."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--server", choices=["daphne", "uvicorn"], default="daphne")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["server"] == "uvicorn":
            _serve_uvicorn(options["host"], options["port"])
            return

        from daphne.cli import CommandLineInterface

        _close_oversized_frames_cleanly()

        limit = str(settings.TRANSPORT_MAX_FRAME_BYTES)
        argv = [
            "--bind",
            options["host"],
            "--port",
            str(options["port"]),
            # Autobahn refuses a larger frame with close code 1009 before
            # buffering it whole; the consumer checks again for other servers.
            "--websocket-max-message-size",
            limit,
            "--websocket-max-frame-size",
            limit,
            "--ping-interval",
            str(int(settings.TRANSPORT_WS_PING_INTERVAL)),
            "--ping-timeout",
            str(int(settings.TRANSPORT_WS_PING_TIMEOUT)),
            "--application-close-timeout",
            "5",
            # No plain-text access log on stdout, which carries only JSON
            # lines: django-structlog logs each request, the consumer each
            # WebSocket.
            "--verbosity",
            "0",
            "config.asgi:application",
        ]
        # A log line, not a print: stdout carries only JSON log lines.
        logger.info("serving", extra={"url": f"http://{options['host']}:{options['port']}/"})
        CommandLineInterface().run(argv)


def _serve_uvicorn(host: str, port: int) -> None:
    """Serve with uvicorn (uvloop, httptools), with daphne's limits and pings.

    The `websockets` implementation refuses a frame over ws_max_size with a
    1009 close frame, and passes an application's close reason on, so the
    daphne patches below have no uvicorn counterpart.
    """
    import uvicorn

    logger.info("serving", extra={"url": f"http://{host}:{port}/", "server": "uvicorn"})
    uvicorn.run(
        "config.asgi:application",
        host=host,
        port=port,
        ws="websockets",
        ws_max_size=settings.TRANSPORT_MAX_FRAME_BYTES,
        ws_ping_interval=settings.TRANSPORT_WS_PING_INTERVAL,
        ws_ping_timeout=settings.TRANSPORT_WS_PING_TIMEOUT,
        # Channels' router has no lifespan protocol; "auto" would try it and
        # log that it is unsupported at every start.
        lifespan="off",
        # Client addresses come from TRANSPORT_TRUSTED_PROXIES alone, as under
        # daphne: uvicorn would otherwise believe X-Forwarded-For from loopback.
        proxy_headers=False,
        # Django's logging config stays in charge: stdout carries JSON lines
        # only, and each request is logged by django-structlog.
        log_config=None,
        access_log=False,
    )


def _close_oversized_frames_cleanly() -> None:
    """Make daphne send a close frame (1009) for an oversized frame, and close reasons.

    Autobahn, under daphne, fails a connection by dropping TCP unless
    `failByDrop` is off; daphne does not expose that option, so its factory
    is subclassed here. Clients then see a real close with code 1009.

    Daphne 4.2 also drops the `reason` of an application's close (its
    serverClose passes only the code), and 4429 must carry the retry delay
    there; the protocol is subclassed to pass it on.
    """
    import daphne.server
    from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

    class Protocol(WebSocketProtocol):
        def handle_reply(self, message: dict[str, Any]) -> None:
            reason = message.get("reason")
            if message.get("type") != "websocket.close" or self.state == self.STATE_CONNECTING:
                super().handle_reply(message)
            elif reason:
                self.sendClose(code=message.get("code") or 1000, reason=str(reason))
            else:
                self.serverClose(code=message.get("code"))

    class Factory(WebSocketFactory):
        protocol = Protocol

        def setProtocolOptions(self, **options: Any) -> None:
            super().setProtocolOptions(failByDrop=False, **options)

    daphne.server.WebSocketFactory = Factory
