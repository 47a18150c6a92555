"""How a customer's client proves it may use a conversation: its secret token, never in a URL.

URLs end up in proxy and server access logs, browser history and ``Referer`` headers, so the token
travels in headers only:

- HTTP API (``chat.views``, ``chat.feedback_views``): the ``X-Conversation-Token`` header
  (``TOKEN_HEADER``);
- websocket (``chat.consumers.ChatConsumer``): the ``Sec-WebSocket-Protocol`` header of the handshake,
  the one header a browser's ``WebSocket`` lets a page set. The client offers two subprotocols,
  ``SUBPROTOCOL`` and ``TOKEN_SUBPROTOCOL_PREFIX + token``
  (``new WebSocket(url, ["supportbot.chat", "supportbot.token." + token])``; the token's URL-safe
  base64 alphabet is valid in a subprotocol name); the server selects ``SUBPROTOCOL`` and never echoes
  the token. The same scheme as Kubernetes' ``base64url.bearer.authorization.k8s.io.<token>``.

A ``token`` query parameter is refused outright (``TokenInUrl``), even with a valid header, so a
client that still puts it in URLs fails loudly instead of leaking it silently.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from chat.models import Conversation
from chat.selectors import conversation_get

TOKEN_HEADER = "X-Conversation-Token"
SUBPROTOCOL = "supportbot.chat"
TOKEN_SUBPROTOCOL_PREFIX = "supportbot.token."

TOKEN_IN_URL_MESSAGE = f"conversation tokens are not accepted in URLs; send the {TOKEN_HEADER} header"
FORBIDDEN_MESSAGE = "unknown conversation or wrong token"


class ConversationAccessError(Exception):
    """The caller may not use the conversation: ``status`` is the HTTP status to answer (400 for a
    token in the URL, 403 for a missing or wrong token or an unknown conversation, one answer for all
    three so ids cannot be probed); the message is the one to show."""

    status = 403

    def __init__(self, message: str = FORBIDDEN_MESSAGE):
        super().__init__(message)


class TokenInUrl(ConversationAccessError):
    """A ``token`` query parameter was sent (see the module docstring)."""

    status = 400

    def __init__(self):
        super().__init__(TOKEN_IN_URL_MESSAGE)


def _conversation_with(conversation_id, token: str | None) -> Conversation:
    if not token:
        raise ConversationAccessError()
    try:
        return conversation_get(conversation_id, token=token)
    except Conversation.DoesNotExist:
        raise ConversationAccessError() from None


def request_conversation(request, conversation_id) -> Conversation:
    """The conversation ``conversation_id`` for an HTTP request carrying its token in ``TOKEN_HEADER``.
    Raises ``TokenInUrl`` when the query string has a ``token`` parameter, else
    ``ConversationAccessError`` when the header is missing or wrong or the conversation unknown."""
    if "token" in request.GET:
        raise TokenInUrl()
    return _conversation_with(conversation_id, request.headers.get(TOKEN_HEADER))


def websocket_token(scope: dict) -> str | None:
    """The token offered in an ASGI websocket ``scope``'s subprotocols (``None`` when none is).
    Raises ``TokenInUrl`` when the query string has a ``token`` parameter."""
    query = parse_qs(scope.get("query_string", b"").decode("latin1"), keep_blank_values=True)
    if "token" in query:
        raise TokenInUrl()
    for protocol in scope.get("subprotocols") or []:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return protocol[len(TOKEN_SUBPROTOCOL_PREFIX):]
    return None


def websocket_conversation(scope: dict, conversation_id) -> Conversation:
    """The conversation ``conversation_id`` for a websocket handshake offering its token as a
    subprotocol (``websocket_token``). Raises ``TokenInUrl`` or ``ConversationAccessError`` like
    ``request_conversation``. Reads the database: call it through ``database_sync_to_async``."""
    return _conversation_with(conversation_id, websocket_token(scope))


def websocket_subprotocol(scope: dict) -> str | None:
    """The subprotocol to accept the handshake with: ``SUBPROTOCOL`` when the client offered it (a
    browser that offered subprotocols fails the connection unless one is selected), else ``None``."""
    return SUBPROTOCOL if SUBPROTOCOL in (scope.get("subprotocols") or []) else None


def client_subprotocols(token: str) -> list[str]:
    """The subprotocols a client offers to open conversation ``token``'s websocket (what the widget
    passes to ``new WebSocket(url, protocols)``; Python clients: Channels' ``WebsocketCommunicator``
    ``subprotocols=``, ``websockets``' ``connect(subprotocols=...)``)."""
    return [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token]
