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
from django.urls import re_path  # noqa: E402

from chat.dashboard.routing import websocket_urlpatterns as dashboard_websocket_urlpatterns  # noqa: E402
from chat.routing import websocket_urlpatterns as chat_websocket_urlpatterns  # noqa: E402

# Close code of a websocket handshake to a path no route serves (HTTP's 404 in the 4000-4999 range).
CLOSE_NOT_FOUND = 4404


async def unknown_path(scope, receive, send) -> None:
    """Any websocket path no other route matches: the handshake is refused with close code
    ``CLOSE_NOT_FOUND`` (Channels' ``URLRouter`` would raise ``ValueError``: a 500 and a traceback in
    the log for every probe). A bare ASGI app, not a consumer: it holds no channel-layer channel, so
    nothing is left waiting on Redis after the refusal (a consumer's pending channel receive once kept
    a test's event loop from closing)."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": CLOSE_NOT_FOUND})


websocket_urlpatterns: list = [
    *chat_websocket_urlpatterns,
    *dashboard_websocket_urlpatterns,
    re_path(r"", unknown_path),  # last: matches every path
]

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
