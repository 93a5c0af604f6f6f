"""The WebSocket Origin check, against TRANSPORT_WS_ALLOWED_ORIGINS.

Browsers send `Origin` with every WebSocket handshake and let any page open
one to any host, with the user's cookies: the check stops another site's
page from talking to this service in a user's name. Clients that are not
browsers (scripts, other services) send no Origin and have no such user
to protect, so a missing Origin is let through; a forged one gains nothing
that leaving it out would not. A refused handshake is answered 403 before
any consumer runs.
"""

import logging
from typing import Any
from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings

logger = logging.getLogger(__name__)


class AllowedOrigins(OriginValidator):
    """Let a WebSocket through when its Origin is allowed, or when it sends none."""

    def __init__(self, application: Any) -> None:
        # Patterns are read from settings at each handshake, not kept here.
        super().__init__(application, allowed_origins=[])

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        allowed = settings.TRANSPORT_WS_ALLOWED_ORIGINS
        if any(
            pattern == "*" or self.match_allowed_origin(parsed_origin, pattern)
            for pattern in allowed
        ):
            return True
        logger.warning("websocket origin refused", extra={"origin": parsed_origin.geturl()})
        return False
