"""Chat reads: conversations, their transcripts, and the conversation history used for retrieval."""

from __future__ import annotations

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

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


def conversation_offered_a_person(conversation: Conversation) -> bool:
    """Whether the conversation's latest reply (assistant or agent message) is the assistant's decline,
    which ends by offering a person (``ABSTAIN_MESSAGE``): a "yes" now accepts that offer."""
    latest = (conversation.messages.filter(role__in=[Message.Role.ASSISTANT, Message.Role.AGENT])
              .order_by("-created_at", "-id").values_list("role", "abstained").first())
    return latest == (Message.Role.ASSISTANT, True)


def answered_question(field: str = "id") -> Subquery:
    """Which customer question an answer replied to, as an expression for ``.annotate()`` on a
    queryset of messages (assistant answers): ``field`` (``"id"`` or ``"text"``) of the latest
    ``user`` message of the same conversation before it, in the transcript's order (``created_at``,
    then ``id``); ``NULL`` when there is none. The pipeline stores the question, then its answer, so
    this is the question the answer was composed for.

    ``Message.objects.filter(role="assistant").annotate(question_id=answered_question())``: one
    query however many answers (a subquery per row on the conversation's own messages)."""
    before = Q(created_at__lt=OuterRef("created_at")) | Q(created_at=OuterRef("created_at"), id__lt=OuterRef("id"))
    return Subquery(
        Message.objects.filter(conversation=OuterRef("conversation"), role=Message.Role.USER).filter(before)
        .order_by("-created_at", "-id").values(field)[:1]
    )


# How many of a verified customer's conversations the widget is shown (most recent first).
VERIFIED_CONVERSATIONS_MAX = 50
PREVIEW_MAX_CHARS = 120


def verified_conversation_list(*, origin: str, user_id: str) -> list[dict]:
    """The conversations verified customer ``user_id`` of site ``origin`` started (on any device),
    most recently updated first, at most ``VERIFIED_CONVERSATIONS_MAX``, without the ones that have
    no customer message yet (like the agents' inbox). Each is ``{"id": str, "status": str,
    "created_at": str, "updated_at": str (ISO 8601), "messages": int, "preview": str}`` (``preview``:
    the first question, at most ``PREVIEW_MAX_CHARS`` characters). No token: a device gets one by
    resuming (``verified_conversation_get``). Another site's or another user's conversations are
    never included; ``user_id`` must be non-empty (the caller verified it)."""
    if not origin or not user_id:
        return []
    first_question = (Message.objects.filter(conversation=OuterRef("pk"), role=Message.Role.USER)
                      .order_by("created_at", "id").values("text")[:1])
    rows = (
        Conversation.objects.filter(origin=origin, verified_user_id=user_id)
        .annotate(message_count=Count("messages"), preview=Subquery(first_question))
        .filter(preview__isnull=False)
        .order_by("-updated_at")[:VERIFIED_CONVERSATIONS_MAX]
    )
    return [
        {"id": str(row.pk), "status": row.status, "created_at": row.created_at.isoformat(),
         "updated_at": row.updated_at.isoformat(), "messages": row.message_count,
         "preview": row.preview[:PREVIEW_MAX_CHARS]}
        for row in rows
    ]


def verified_conversation_get(conversation_id, *, origin: str, user_id: str) -> Conversation:
    """The conversation ``conversation_id`` if verified customer ``user_id`` of site ``origin``
    started it. Raises ``Conversation.DoesNotExist`` otherwise (unknown or malformed id, another
    user's, another site's, an anonymous one: one error for all)."""
    if not origin or not user_id:
        raise Conversation.DoesNotExist("no such conversation")
    conversation = conversation_get(conversation_id)
    if conversation.origin != origin or conversation.verified_user_id != user_id:
        raise Conversation.DoesNotExist("no such conversation")
    return conversation
