"""Which web origins may use the chat widget's HTTP API and websocket.

The widget runs on the company's own pages (another origin than this server), so the allowed origins
are the setting ``WIDGET_ALLOWED_ORIGINS`` (``scheme://host[:port]`` patterns, ``"*"`` for any) plus the
site's own hosts (``ALLOWED_HOSTS``). Matching is Channels' ``OriginValidator`` matching (a pattern
without a scheme matches the host on any scheme and port; ``.example.com`` also matches subdomains).

A request without an ``Origin`` header is allowed: browsers always send one on cross-origin requests
and websocket handshakes, so only non-browser clients omit it, and those can forge any header; the
conversation token, not the origin, is what guards a conversation. The origin check stops other
websites from driving a visitor's browser against this server.

Which knowledge base a new conversation answers from is decided here too, from the origin and the
admin's ``WidgetSite`` rows (``conversation_collection``), never by the client alone: a page can set
``data-collection`` to anything, but not its ``Origin``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlparse

from channels.security.websocket import OriginValidator
from django.conf import settings

from chat.models import WIDGET_ORIGIN_PATTERN, WidgetSite
from knowledge.models import DEFAULT_COLLECTION


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


# --- which collection a site's conversations answer from -------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_normalize(value: str) -> str:
    """``value`` (what an admin types: ``HTTPS://Shop.Example.com:443/``) as a browser sends it in
    ``Origin``: lower-case scheme and host, no default port, no path (``https://shop.example.com``).
    Raises ``ValueError`` (with the reason) for anything else: another scheme, a path, query,
    credentials, or no host."""
    text = (value or "").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("not an origin: expected scheme://host[:port], e.g. https://shop.example.com") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("an origin is http:// or https:// followed by a host, e.g. https://shop.example.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("an origin has no path, query or credentials: scheme://host[:port] only")
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    origin = f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")
    if not re.fullmatch(WIDGET_ORIGIN_PATTERN, origin):
        raise ValueError("not an origin: expected scheme://host[:port], e.g. https://shop.example.com")
    return origin


class CollectionRefused(Exception):
    """The widget asked for a collection its site is not mapped to (the message says which)."""


def conversation_collection(*, origin: str | None, requested: str | None) -> str:
    """The knowledge-base collection for a new conversation started from ``origin`` (the request's
    ``Origin`` header; ``None`` or empty when absent) by a widget asking for ``requested`` (its
    ``data-collection``; ``None`` when it names none).

    - a site with a ``WidgetSite`` row gets that row's collection; naming another is refused;
    - any other origin (or none) gets ``DEFAULT_COLLECTION``; naming another is refused.

    Raises ``CollectionRefused``; reads one row."""
    site = WidgetSite.objects.filter(origin=origin).first() if origin else None
    collection = site.collection if site is not None else DEFAULT_COLLECTION
    if requested is not None and requested != collection:
        where = f"the site {origin}" if site is not None else "a site without its own collection (admin: Widget sites)"
        raise CollectionRefused(f"the collection {requested!r} is not served to {where}")
    return collection
