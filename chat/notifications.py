"""Pushing conversation events over the Channels layer (channels-redis, so across web processes).

Two audiences:

- agents: every agent dashboard socket joins the group ``AGENTS_CHANNEL_GROUP`` (``"agents"``) and receives
  ``{"type": "inbox.changed", "conversation_id": str, "kind": str}``; the page then re-fetches the
  server-rendered inbox or transcript. The event is deliberately small: it carries no message text,
  so what an agent sees always comes through the permission-checked HTTP views;
- the customer: the conversation's group (``conversation.<id>``, joined by ``chat.consumers.ChatConsumer``)
  receives ``chat.agent_message`` ``{"message_id", "text", "created_at"}`` and ``chat.status``
  ``{"status", "message"}``, which the consumer relays to the widget as they are.

Synchronous callers (services) send after their transaction commits (``transaction.on_commit``), so
a listener that re-reads the database sees the change. The services that change a conversation call
these themselves: ``chat.services`` (new conversation, customer message, answer, handoff),
``chat.agent_services`` (takeover, agent message, hand-back, resolve, reviewed), ``chat.feedback``
and ``tuning.services`` (corrections); so every interface (websocket, HTTP, admin, shell) notifies.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from chat.redis_outage import REDIS_ERRORS, redis_error_text

logger = logging.getLogger(__name__)

# The channel-layer group every agent dashboard socket joins (not the auth group of agents,
# ``chat.access.AGENTS_GROUP``, "Agents").
AGENTS_CHANNEL_GROUP = "agents"


def conversation_group(conversation_id) -> str:
    """The channel-layer group of a conversation's customer sockets: ``conversation.<uuid>``, which
    ``chat.consumers.ChatConsumer`` joins and ``customer_notify`` sends to (the one definition)."""
    return f"conversation.{conversation_id}"


def inbox_event(conversation_id, kind: str) -> dict:
    """The agents' event: ``{"type": "inbox.changed", "conversation_id": str, "kind": kind}`` where
    ``kind`` is one of ``message``, ``status``, ``feedback``, ``correction`` (a new conversation is
    announced by its first message)."""
    return {"type": "inbox.changed", "conversation_id": str(conversation_id), "kind": kind}


def _send(group: str, event: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, event)
    except REDIS_ERRORS as error:  # best effort: the change is committed, pages re-read it on reconnect
        logger.warning("could not send %s to %s: its Redis is unavailable (%s)", event.get("type"), group,
                       redis_error_text(error))
    except Exception:  # a notification is best effort: the change itself is committed
        logger.exception("could not send %s to %s", event.get("type"), group)


def inbox_notify(conversation_id, kind: str) -> None:
    """Tell every agent dashboard that conversation ``conversation_id`` changed, once the current
    transaction commits (immediately outside one). Never raises: a failed send is logged.
    Call from synchronous code only (async code: ``await layer.group_send(AGENTS_CHANNEL_GROUP, inbox_event(...))``)."""
    transaction.on_commit(lambda: _send(AGENTS_CHANNEL_GROUP, inbox_event(conversation_id, kind)))


def customer_notify(conversation_id, event: dict) -> None:
    """Send ``event`` (``{"type": "chat.agent_message" | "chat.status", ...}``) to the customer's
    sockets of conversation ``conversation_id`` after the current transaction commits. Never raises."""
    transaction.on_commit(lambda: _send(conversation_group(conversation_id), event))
