from django.urls import path

from transport import demo, views

urlpatterns = [
    path("sessions", views.create_session),
    path("actions", views.actions),
    path("poll", views.poll),
    path("mailbox", views.mailbox),
    path("ack", views.ack),
    path("demo/", demo.page, name="transport-demo"),
]
