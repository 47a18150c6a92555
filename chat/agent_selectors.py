"""Agent reads for the review dashboard: the inbox (filters and text search) and a conversation's
transcript with each answer's retrieval trace, citations, timings and model version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Subquery
from django.db.models.expressions import RawSQL

from chat.models import AnswerFeedback, Conversation, Message
from knowledge.models import Chunk

# An answer whose closest retrieved chunk is farther than this cosine distance (0..2) counts as weak
# retrieval in the inbox filter (below ``ABSTAIN_MAX_DISTANCE``, where the bot declines to answer).
WEAK_RETRIEVAL_DISTANCE = getattr(settings, "DASHBOARD_WEAK_RETRIEVAL_DISTANCE", 0.5)

INBOX_FILTERS = {
    "needs_human": "Needs a human",
    "abstained": "Abstained",
    "thumbs_down": "Thumbs down",
    "weak_retrieval": "Weak retrieval",
    "unreviewed": "Unreviewed",
}

# The smallest cosine distance in an assistant message's retrieval trace (NULL when none).
_BEST_DISTANCE_SQL = (
    "(SELECT min((e->>'vector_distance')::float) FROM jsonb_array_elements(chat_message.retrieval) e "
    "WHERE e->>'vector_distance' IS NOT NULL)"
)


def weak_retrieval_messages() -> QuerySet[Message]:
    """Assistant answers (not abstentions) whose closest retrieved chunk is farther than
    ``WEAK_RETRIEVAL_DISTANCE`` (answers without a vector-retrieved chunk are abstentions in the
    pipeline, so they are not counted here)."""
    best = RawSQL(_BEST_DISTANCE_SQL, [])
    return (
        Message.objects.filter(role=Message.Role.ASSISTANT, abstained=False)
        .annotate(best_distance=best)
        .filter(best_distance__gt=WEAK_RETRIEVAL_DISTANCE)
    )


def inbox_list(*, filters: list[str] | tuple[str, ...] = (), query: str = "", limit: int = 100) -> QuerySet[Conversation]:
    """Conversations for the inbox, newest activity (``updated_at``) first, at most ``limit``.

    ``filters`` (all must hold; unknown names are ignored): ``needs_human`` (status), ``abstained``
    (an abstained answer), ``thumbs_down`` (an answer the customer rated down), ``weak_retrieval``
    (see ``weak_retrieval_messages``), ``unreviewed`` (never marked reviewed). ``query`` matches,
    case-insensitively, any message text or the start of the conversation id. Each row is annotated
    with ``message_count``, ``abstained_count``, ``thumbs_down_count``, ``first_question`` and
    ``last_text``.
    """
    conversations = Conversation.objects.select_related("assigned_agent")
    own = Message.objects.filter(conversation=OuterRef("pk"))
    if "needs_human" in filters:
        conversations = conversations.filter(status=Conversation.Status.NEEDS_HUMAN)
    if "abstained" in filters:
        conversations = conversations.filter(Exists(own.filter(role=Message.Role.ASSISTANT, abstained=True)))
    if "thumbs_down" in filters:
        conversations = conversations.filter(Exists(AnswerFeedback.objects.filter(
            message__conversation=OuterRef("pk"), value=AnswerFeedback.Value.DOWN)))
    if "weak_retrieval" in filters:
        conversations = conversations.filter(Exists(weak_retrieval_messages().filter(conversation=OuterRef("pk"))))
    if "unreviewed" in filters:
        conversations = conversations.filter(reviewed_at__isnull=True)
    query = (query or "").strip()
    if query:
        conversations = conversations.filter(
            Exists(own.filter(text__icontains=query)) | Q(id__startswith=query)
            if _looks_like_uuid_prefix(query) else Exists(own.filter(text__icontains=query))
        )
    first_question = own.filter(role=Message.Role.USER).order_by("created_at", "id").values("text")[:1]
    last_text = own.exclude(role=Message.Role.SYSTEM).order_by("-created_at", "-id").values("text")[:1]
    return conversations.annotate(
        message_count=Count("messages", filter=~Q(messages__role=Message.Role.SYSTEM), distinct=True),
        abstained_count=Count("messages", filter=Q(messages__abstained=True), distinct=True),
        thumbs_down_count=Count("messages__feedback", filter=Q(messages__feedback__value="down"), distinct=True),
        first_question=Subquery(first_question),
        last_text=Subquery(last_text),
    ).order_by("-updated_at", "-created_at")[:limit]


def _looks_like_uuid_prefix(query: str) -> bool:
    return len(query) >= 4 and all(c in "0123456789abcdef-" for c in query.lower())


@dataclass
class AnswerDetail:
    """An assistant message as the dashboard shows it: ``retrieved`` the retrieval trace joined with
    the chunks that still exist (``[{"n", "chunk_id", "source_id", "source_title", "score",
    "vector_distance", "text_rank", "text", "shown_to_model", "cited"}]``, ``text`` empty when the
    chunk was re-ingested since); ``question`` the customer message it answered."""

    message: Message
    question: Message | None
    retrieved: list[dict] = field(default_factory=list)
    best_distance: float | None = None


def conversation_detail(conversation_id) -> tuple[Conversation, list[Message], dict[int, AnswerDetail]]:
    """The conversation, all its messages oldest first (with ``feedback`` and ``model_version``), and
    for each assistant message id its ``AnswerDetail`` (also set as the message's ``detail``
    attribute, for templates). Raises ``Conversation.DoesNotExist``."""
    conversation = Conversation.objects.select_related("assigned_agent").get(pk=conversation_id)
    messages = list(
        conversation.messages.select_related("model_version", "feedback").order_by("created_at", "id")
    )
    chunk_ids = {entry.get("chunk_id") for m in messages if m.role == Message.Role.ASSISTANT for entry in m.retrieval}
    chunks = Chunk.objects.select_related("source").defer("embedding", "search_vector", "source__text").in_bulk(
        [i for i in chunk_ids if i is not None]
    )
    details: dict[int, AnswerDetail] = {}
    last_question = None
    for message in messages:
        if message.role == Message.Role.USER:
            last_question = message
        if message.role != Message.Role.ASSISTANT:
            continue
        cited = {c.get("chunk_id"): c.get("n") for c in message.citations}
        retrieved = []
        for n, entry in enumerate(message.retrieval, start=1):
            chunk = chunks.get(entry.get("chunk_id"))
            retrieved.append({
                "n": n, **entry,
                "source_title": chunk.source.title or chunk.source.uri if chunk else "",
                "text": chunk.text if chunk else "",
                "shown_to_model": not message.abstained and n <= settings.LLM_PROMPT_SOURCES,
                "cited": cited.get(entry.get("chunk_id")),
            })
        distances = [e["vector_distance"] for e in message.retrieval if e.get("vector_distance") is not None]
        details[message.pk] = AnswerDetail(message=message, question=last_question, retrieved=retrieved,
                                           best_distance=min(distances) if distances else None)
        message.detail = details[message.pk]
    return conversation, messages, details
