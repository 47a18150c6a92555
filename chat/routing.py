"""Websocket routes of the chat app (included by ``config.asgi``).

The customer's socket is opened from the widget on the company's pages, so its route checks the
``Origin`` against ``WIDGET_ALLOWED_ORIGINS`` plus the site's own hosts (``chat.origins``), not only
against this site's hosts. Staff routes (the agent dashboard) use session cookies and must stay
same-origin: wrap them in Channels' ``AllowedHostsOriginValidator`` instead.
"""

from django.urls import path

from chat.consumers import ChatConsumer
from chat.origins import WidgetOriginValidator

websocket_urlpatterns = [
    path("ws/chat/<uuid:conversation_id>/", WidgetOriginValidator(ChatConsumer.as_asgi()), name="ws_chat"),
]
