"""The demo page: two browser tabs chatting through the browser client."""

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def page(request: HttpRequest) -> HttpResponse:
    """Called for /transport/demo/: serve the chat page, unless TRANSPORT_DEMO is off."""
    if not settings.TRANSPORT_DEMO:
        raise Http404("the demo is turned off")
    return render(request, "transport/demo.html")
