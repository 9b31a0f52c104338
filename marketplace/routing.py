"""WebSocket routes of the marketplace (mounted by flexsite.asgi)."""

from django.urls import path

from marketplace.consumers import TaskConsumer

websocket_urlpatterns = [
    path("ws/tasks/<int:task_id>/", TaskConsumer.as_asgi()),
]
