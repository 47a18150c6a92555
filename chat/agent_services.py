"""Agent writes on conversations (the review dashboard): takeover, agent messages, hand back to the
bot, resolve, mark reviewed.

Takeover is exclusive: ``conversation_take`` is one conditional ``UPDATE`` (only a conversation that
no agent holds and that is not resolved is taken), so of two agents clicking at once exactly one
wins, in any number of web processes; the table's check constraint
``conversation_assigned_only_while_agent`` allows an assigned agent only while the status is ``agent``. While
the status is ``agent``, ``chat.services.answer_stream`` stores the customer's questions without
answering (the bot stays quiet).

Each change is pushed after commit: to the customer's widget (``chat.agent_message`` /
``chat.status`` on ``conversation.<id>``) and to every agent dashboard (``inbox.changed``).
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from chat.models import Conversation, Message
from chat.notifications import customer_notify, inbox_notify

TAKEOVER_SYSTEM_MESSAGE = "{agent} joined the conversation."
HAND_BACK_SYSTEM_MESSAGE = "{agent} handed the conversation back to the assistant."
RESOLVE_SYSTEM_MESSAGE = "{agent} resolved the conversation."
# What the customer's widget is told (``chat.status`` ``message``).
CUSTOMER_JOINED_MESSAGE = "A support agent joined the conversation."
CUSTOMER_HAND_BACK_MESSAGE = "The assistant is answering again."
CUSTOMER_RESOLVED_MESSAGE = "This conversation was marked as resolved."
AGENT_MESSAGE_MAX_CHARS = 4000


class TakeoverError(Exception):
    """The conversation cannot be taken (another agent holds it, or it is resolved), or the acting
    agent does not hold it (for messages and hand-back)."""


def agent_display_name(user) -> str:
    """How an agent is named in system messages: first name, else username."""
    return user.first_name or user.get_username()


def conversation_take(conversation_id, *, agent) -> Conversation:
    """Take the conversation over for ``agent``: status ``agent``, ``assigned_agent = agent``, a system
    message, ``chat.status`` ``{"status": "agent", "message": CUSTOMER_JOINED_MESSAGE}`` to the
    customer.

    Atomic and exclusive (one conditional UPDATE). Idempotent for the agent who already holds it (no
    second message or event). Raises ``TakeoverError`` when another agent holds it or it is
    resolved, ``Conversation.DoesNotExist`` when there is no such conversation (nothing changes then).
    """
    with transaction.atomic():
        taken = (
            Conversation.objects.filter(pk=conversation_id, assigned_agent__isnull=True)
            .exclude(status=Conversation.Status.RESOLVED)
            .update(status=Conversation.Status.AGENT, assigned_agent=agent, updated_at=timezone.now())
        )
        conversation = Conversation.objects.get(pk=conversation_id)
        if not taken:
            if conversation.assigned_agent_id == agent.pk:
                return conversation
            if conversation.status == Conversation.Status.RESOLVED:
                raise TakeoverError("this conversation is resolved")
            raise TakeoverError("another agent has taken this conversation")
        Message.objects.create(
            conversation=conversation, role=Message.Role.SYSTEM, kind=Message.Kind.TAKEOVER,
            text=TAKEOVER_SYSTEM_MESSAGE.format(agent=agent_display_name(agent)),
        )
        customer_notify(conversation.pk, {"type": "chat.status", "status": Conversation.Status.AGENT,
                                          "message": CUSTOMER_JOINED_MESSAGE})
        inbox_notify(conversation.pk, "status")
    return conversation


def _release(conversation_id, *, agent, status: str, kind: str, system_text: str, customer_text: str,
             require_holder: bool) -> Conversation:
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
        if require_holder and conversation.assigned_agent_id not in (None, agent.pk) and not agent.is_staff:
            raise TakeoverError("another agent holds this conversation")
        if conversation.status == status:
            return conversation
        conversation.status = status
        conversation.assigned_agent = None
        conversation.save(update_fields=["status", "assigned_agent", "updated_at"])
        Message.objects.create(conversation=conversation, role=Message.Role.SYSTEM, kind=kind,
                               text=system_text.format(agent=agent_display_name(agent)))
        customer_notify(conversation.pk, {"type": "chat.status", "status": status, "message": customer_text})
        inbox_notify(conversation.pk, "status")
    return conversation


def conversation_hand_back(conversation_id, *, agent) -> Conversation:
    """Give the conversation back to the bot: status ``bot``, no assigned agent, a system message,
    ``chat.status`` ``{"status": "bot"}`` to the customer. Only the holding agent (or staff) may;
    otherwise ``TakeoverError`` and nothing changes. A conversation already ``bot`` is unchanged."""
    return _release(conversation_id, agent=agent, status=Conversation.Status.BOT, kind=Message.Kind.HAND_BACK,
                    system_text=HAND_BACK_SYSTEM_MESSAGE, customer_text=CUSTOMER_HAND_BACK_MESSAGE,
                    require_holder=True)


def conversation_resolve(conversation_id, *, agent) -> Conversation:
    """Mark the conversation resolved (no assigned agent), with a system message and ``chat.status``
    ``{"status": "resolved"}`` to the customer. Any agent may resolve a conversation nobody holds;
    one held by another agent only that agent or staff (else ``TakeoverError``)."""
    return _release(conversation_id, agent=agent, status=Conversation.Status.RESOLVED, kind=Message.Kind.RESOLVED,
                    system_text=RESOLVE_SYSTEM_MESSAGE, customer_text=CUSTOMER_RESOLVED_MESSAGE,
                    require_holder=True)


def agent_message_send(conversation_id, *, agent, text: str) -> Message:
    """Store the agent's ``text`` (stripped, 1..``AGENT_MESSAGE_MAX_CHARS`` characters) as a message of
    role ``agent`` and send it to the customer's widget as ``chat.agent_message`` ``{"message_id",
    "text", "created_at"}``.

    Only the agent holding the conversation may write (``TakeoverError`` otherwise); ``ValueError``
    for empty or too long text. Nothing is stored on error.
    """
    text = (text or "").strip()
    if not text:
        raise ValueError("the message is empty")
    if len(text) > AGENT_MESSAGE_MAX_CHARS:
        raise ValueError(f"the message is longer than {AGENT_MESSAGE_MAX_CHARS} characters")
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
        if conversation.status != Conversation.Status.AGENT or conversation.assigned_agent_id != agent.pk:
            raise TakeoverError("take the conversation over before writing to the customer")
        message = Message.objects.create(conversation=conversation, role=Message.Role.AGENT, text=text)
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=message.created_at)
        customer_notify(conversation.pk, {"type": "chat.agent_message", "message_id": message.pk, "text": text,
                                          "created_at": message.created_at.isoformat()})
        inbox_notify(conversation.pk, "message")
    return message


def conversation_mark_reviewed(conversation_id, *, agent, reviewed: bool = True) -> Conversation:
    """Mark the conversation reviewed now (``reviewed=False``: unreviewed again). ``agent`` is the
    acting user (the caller checks the permission)."""
    Conversation.objects.filter(pk=conversation_id).update(reviewed_at=timezone.now() if reviewed else None)
    inbox_notify(conversation_id, "status")
    return Conversation.objects.get(pk=conversation_id)


__all__ = [
    "TakeoverError", "conversation_take", "conversation_hand_back", "conversation_resolve",
    "agent_message_send", "conversation_mark_reviewed",
]
