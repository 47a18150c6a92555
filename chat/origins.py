"""Which web origins may use the chat widget's HTTP API and websocket.

The widget runs on the company's own pages (another origin than this server), so the allowed origins
are the setting ``WIDGET_ALLOWED_ORIGINS`` (``scheme://host[:port]`` patterns, ``"*"`` for any) plus the
site's own hosts (``ALLOWED_HOSTS``). Matching is Channels' ``OriginValidator`` matching (a pattern
without a scheme matches the host on any scheme and port; ``.example.com`` also matches subdomains).

A request without an ``Origin`` header is allowed: browsers always send one on cross-origin requests
and websocket handshakes, so only non-browser clients omit it, and those can forge any header; the
conversation token, not the origin, is what guards a conversation. The origin check stops other
websites from driving a visitor's browser against this server.
"""

from __future__ import annotations

from urllib.parse import urlparse

from channels.security.websocket import OriginValidator
from django.conf import settings


def widget_allowed_origins() -> list[str]:
    """The origin patterns allowed to embed the widget: ``WIDGET_ALLOWED_ORIGINS`` + ``ALLOWED_HOSTS``
    (with Channels' development fallback to localhost when ``DEBUG`` and ``ALLOWED_HOSTS`` is empty)."""
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = ["localhost", "127.0.0.1", "[::1]"]
    return [*settings.WIDGET_ALLOWED_ORIGINS, *hosts]


class WidgetOriginValidator(OriginValidator):
    """ASGI middleware for websocket routes the widget connects to: denies (closes before accepting)
    a handshake whose ``Origin`` is not allowed; a handshake without ``Origin`` passes (see module
    docstring). The allowed list is read per connection, so settings overrides in tests apply."""

    def __init__(self, application):
        super().__init__(application, allowed_origins=[])

    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        self.allowed_origins = widget_allowed_origins()
        return self.validate_origin(parsed_origin)


def origin_allowed(origin: str | None) -> bool:
    """Whether an HTTP request with the ``Origin`` header value ``origin`` (``None`` when absent) may
    use the widget API. ``"null"`` (sandboxed frames, ``file:`` pages) is allowed only with ``"*"``."""
    if origin is None:
        return True
    allowed = widget_allowed_origins()
    if "*" in allowed:
        return True
    if origin == "null":
        return False
    return OriginValidator(None, allowed).validate_origin(urlparse(origin))
