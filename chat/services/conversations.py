"""Conversation writes: starting a conversation, handing it to a human, storing its messages (each
announced to the agents' dashboards), and the fixed texts customers are shown (``ABSTAIN_MESSAGE``,
``HANDOFF_MESSAGE``, ``BUSY_MESSAGE``, ...).

Part of ``chat.services``; import from the package (``from chat.services import conversation_start``).
"""

from __future__ import annotations

from django.db import transaction

from chat.models import Conversation, Message, WidgetSite, widget_identity_secret
from chat.notifications import customer_notify, inbox_notify

ABSTAIN_MESSAGE = (
    "I couldn't find this in our help articles, so I'd rather not guess. "
    "Would you like me to connect you with a person?"
)
HANDOFF_MESSAGE = "The customer asked to talk to a person."
# What the customer's widget tabs are told (``chat.status`` ``message``) after a handoff request.
CUSTOMER_HANDOFF_MESSAGE = "We've asked a person to join the conversation."
# Replies to a message that is only a greeting, thanks or goodbye (``chat.intents.small_talk``).
SMALL_TALK_REPLIES = {
    "greeting": "Hello! I can answer questions from our help articles. What would you like to know?",
    "thanks": "You're welcome! Is there anything else I can help with?",
    "goodbye": "Thanks for chatting with us. Goodbye!",
}
BUSY_MESSAGE = "Our assistant is busy right now; retrying in a moment."
AGENT_ACTIVE_MESSAGE = "A support agent is handling this conversation."


def conversation_start(*, collection: str = "default", origin: str = "", verified_user_id: str = "") -> Conversation:
    """Create a conversation (status ``bot``) with a fresh secret token; ``collection`` is the
    knowledge-base collection its answers are retrieved from, ``origin`` the embedding site,
    ``verified_user_id`` the signed-in customer's id once ``chat.identity.identity_check`` verified
    it for ``origin`` ("" for an anonymous visitor; a database constraint refuses it without origin).

    The agents' dashboards are not told: the inbox lists a conversation from its first message
    (which notifies them), so a script starting conversations in a loop wakes no inbox."""
    return Conversation.objects.create(collection=collection or "default", origin=origin[:300],
                                       verified_user_id=verified_user_id)


def conversation_request_human(conversation: Conversation) -> Conversation:
    """Hand the conversation to a human: status ``needs_human`` plus a system message saying so.

    Idempotent: a conversation already ``needs_human`` or ``agent`` is returned unchanged (no second
    system message). A ``resolved`` conversation is reopened as ``needs_human``.

    Side effects, after commit: the conversation's channel-layer group (every open widget tab of
    it, ``conversation.<id>``) receives ``chat.status`` ``{"status", "message"}`` with the status it
    now has, on every call, so a tab that asks again learns the current status too (``message`` is
    ``CUSTOMER_HANDOFF_MESSAGE`` or, while an agent holds it, ``AGENT_ACTIVE_MESSAGE``); when the
    status changed, the agents' dashboards receive ``inbox.changed`` (kind ``status``).
    """
    with transaction.atomic():
        locked = Conversation.objects.select_for_update().get(pk=conversation.pk)
        if locked.status not in (Conversation.Status.NEEDS_HUMAN, Conversation.Status.AGENT):
            locked.status = Conversation.Status.NEEDS_HUMAN
            locked.save(update_fields=["status", "updated_at"])
            Message.objects.create(conversation=locked, role=Message.Role.SYSTEM, kind=Message.Kind.HANDOFF,
                                   text=HANDOFF_MESSAGE)
            inbox_notify(locked.pk, "status")
        message = AGENT_ACTIVE_MESSAGE if locked.status == Conversation.Status.AGENT else CUSTOMER_HANDOFF_MESSAGE
        customer_notify(locked.pk, {"type": "chat.status", "status": locked.status, "message": message})
    return locked


def _store_message(conversation: Conversation, **fields) -> Message:
    """Create a message of ``conversation``, mark the conversation as active now (``updated_at``, the
    inbox's order) and, once committed, tell the agents' dashboards (``inbox.changed``, kind
    ``message``)."""
    message = Message.objects.create(conversation=conversation, **fields)
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=message.created_at)
    inbox_notify(conversation.pk, "message")
    return message


def widget_site_identity_secret_rotate(site: WidgetSite) -> WidgetSite:
    """Give ``site`` a new identity secret (``chat.models.widget_identity_secret``): hashes signed
    with the old one stop verifying at once, so the host site must deploy the new secret. Already
    verified conversations keep their ``verified_user_id`` (the customer still lists them with a
    hash made with the new secret). Returns the site with the new secret saved."""
    site.identity_secret = widget_identity_secret()
    site.save(update_fields=["identity_secret", "updated_at"])
    return site
