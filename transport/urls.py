from django.urls import path

from transport import demo, openapi, views

urlpatterns = [
    path("sessions", views.create_session),
    path("actions", views.actions),
    path("poll", views.poll),
    path("mailbox", views.mailbox),
    path("ack", views.ack),
    path("openapi.json", openapi.openapi, name="transport-openapi"),
    path("demo/", demo.page, name="transport-demo"),
]
