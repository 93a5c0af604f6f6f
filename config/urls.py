"""URL map: transport endpoints, health checks, metrics and the admin."""

from django.contrib import admin
from django.urls import include, path

from telemetry.access import restricted
from telemetry.collector import metrics
from transport import health

urlpatterns = [
    path("transport/", include("transport.urls")),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", restricted(metrics), name="metrics"),
    path("admin/", admin.site.urls),
]
