"""Websocket routes of the agent dashboard (included by ``config.asgi``). Staff sockets use the
session cookie, so they only accept this site's own origin (``AllowedHostsOriginValidator``)."""

from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from chat.dashboard.consumers import AgentConsumer

websocket_urlpatterns = [
    path("ws/agent/", AllowedHostsOriginValidator(AgentConsumer.as_asgi()), name="ws_agent"),
]
