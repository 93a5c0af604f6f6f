from django.urls import path

from transport import views

urlpatterns = [
    path("sessions", views.create_session),
    path("actions", views.actions),
    path("poll", views.poll),
    path("mailbox", views.mailbox),
    path("ack", views.ack),
]
