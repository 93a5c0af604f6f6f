from django.urls import path

from transport.consumers import TransportConsumer

websocket_urlpatterns = [
    path("ws/transport/", TransportConsumer.as_asgi()),
]
