"""Chat reads: conversations, their transcripts, and the conversation history used for retrieval."""

from __future__ import annotations

from django.db.models import QuerySet

from chat.models import Conversation, Message


def conversation_get(conversation_id, *, token: str | None = None) -> Conversation:
    """The conversation ``conversation_id`` (UUID or its string).

    With ``token``, the conversation must carry that secret (compared in constant time). Raises
    ``Conversation.DoesNotExist`` when there is no such conversation, the id is malformed, or the
    token does not match (one error for all three, so a caller cannot probe which ids exist).
    """
    import secrets
    import uuid

    try:
        key = conversation_id if isinstance(conversation_id, uuid.UUID) else uuid.UUID(str(conversation_id))
    except ValueError:
        raise Conversation.DoesNotExist("no such conversation") from None
    conversation = Conversation.objects.get(pk=key)
    if token is not None and not secrets.compare_digest(conversation.token.encode(), str(token).encode()):
        raise Conversation.DoesNotExist("no such conversation")
    return conversation


def conversation_messages(conversation: Conversation) -> QuerySet[Message]:
    """The conversation's messages, oldest first."""
    return conversation.messages.order_by("created_at", "id")


def conversation_history(conversation: Conversation, *, limit: int = 10) -> list[dict]:
    """The latest ``limit`` customer, assistant and agent turns, oldest first, as
    ``{"role": "user"|"assistant"|"agent", "text": str}`` (the shape ``retrieval_query`` reads).
    Abstention messages are left out: they say nothing about the topic."""
    rows = (
        conversation.messages.filter(role__in=[Message.Role.USER, Message.Role.ASSISTANT, Message.Role.AGENT])
        .exclude(role=Message.Role.ASSISTANT, abstained=True)
        .order_by("-created_at", "-id")
        .values_list("role", "text")[:limit]
    )
    return [{"role": role, "text": text} for role, text in reversed(list(rows))]


def conversation_list(*, status: str | None = None) -> QuerySet[Conversation]:
    """Conversations, most recently updated first, optionally of one ``status``."""
    conversations = Conversation.objects.all()
    return conversations.filter(status=status) if status else conversations
