"""URL map: transport endpoints, health checks and the admin."""

from django.contrib import admin
from django.urls import include, path

from transport import health

urlpatterns = [
    path("transport/", include("transport.urls")),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("admin/", admin.site.urls),
]
