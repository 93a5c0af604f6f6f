"""Who may read /metrics: clients in METRICS_ALLOWED_NETWORKS, or a bearer token.

Metrics name mailboxes (the deepest sessions' ids) and show the service's
load to anyone who asks: they are for the monitoring system, which scrapes
from a known network or presents METRICS_BEARER_TOKEN.
"""

import functools
import hmac
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from transport import clients

View = Callable[[HttpRequest], HttpResponse]


def _has_token(request: HttpRequest) -> bool:
    expected = settings.METRICS_BEARER_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def _from_allowed_network(request: HttpRequest) -> bool:
    address = clients.parse(clients.of_request(request))
    return address is not None and clients.within(address, settings.METRICS_ALLOWED_NETWORKS)


def restricted(view: View) -> View:
    """Serve `view` only to allowed networks or holders of the bearer token."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest) -> HttpResponse:
        if _from_allowed_network(request) or _has_token(request):
            return view(request)
        if settings.METRICS_BEARER_TOKEN:
            response = HttpResponse(
                "bearer token required\n", status=401, content_type="text/plain"
            )
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")

    return wrapper
