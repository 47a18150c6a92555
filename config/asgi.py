"""ASGI entry point: HTTP through Django, websockets through Channels' URL router.

Each websocket route checks the ``Origin`` of the handshake itself: the customer's chat socket
accepts the widget's embedding sites (``chat.routing``), staff sockets only this site
(``AllowedHostsOriginValidator``).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.dashboard.routing import websocket_urlpatterns as dashboard_websocket_urlpatterns  # noqa: E402
from chat.routing import websocket_urlpatterns as chat_websocket_urlpatterns  # noqa: E402

websocket_urlpatterns: list = [
    *chat_websocket_urlpatterns,
    *dashboard_websocket_urlpatterns,
]

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
