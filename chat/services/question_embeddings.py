"""Question embeddings: the vectors of the customer questions the assistant could not answer, stored
once (``chat.models.QuestionEmbedding``) so that the analytics page's content gaps only read them.

Before, the analytics page embedded up to 500 questions in its own request, holding the process-wide
embedding lock (``knowledge.embedding``) for seconds while customers' retrieval in the same web
process waited. Now the answer pipeline records the vector it already computed for retrieval when it
abstains (``question_embedding_store``, no extra model call), and a Celery task
(``chat.embed_unanswered_questions`` on beat, ``QUESTION_EMBEDDINGS_SWEEP_S``) embeds what is
missing in a worker: questions answered before this table existed, and every question again after
the embedding model changed (``knowledge.embedding.model_id()``).

Part of ``chat.services``; import from the package.
"""

from __future__ import annotations

from django.db.models import Subquery

from chat.models import Message, QuestionEmbedding
from chat.selectors import answered_question

# Questions embedded per ``unanswered_questions_embed`` run (a beat run; the rest wait for the next),
# and per ``encode`` call (the embedding lock is held per call).
EMBED_RUN_MAX = 2000
EMBED_BATCH = 64


def question_embedding_store(message_id: int, embedding) -> None:
    """Record ``embedding`` (``list[float]`` or a float32 array of length ``EMBEDDING_DIM``, unit
    norm, from ``knowledge.embedding``'s current model) as the vector of customer question
    ``message_id`` (a ``user`` message). Replaces an earlier one (one ``INSERT ... ON CONFLICT``). It
    is recorded under the version that made it (``knowledge.embedding.vectors_model_id``; the active
    one for a plain list), so a vector made just before a promotion is re-embedded by the sweep."""
    from knowledge.embedding import model_id, vectors_model_id

    QuestionEmbedding.objects.bulk_create(
        [QuestionEmbedding(message_id=message_id, embedding=embedding,
                           embedding_model=vectors_model_id(embedding) or model_id())],
        update_conflicts=True, unique_fields=["message"], update_fields=["embedding", "embedding_model"],
    )


def questions_without_embedding():
    """The customer questions of abstained answers (``chat.selectors.answered_question``) without a
    vector of the current embedding model, newest first: a ``Message`` queryset."""
    from knowledge.embedding import model_id

    asked = Message.objects.filter(role=Message.Role.ASSISTANT, abstained=True).annotate(
        question_id=answered_question()).values("question_id")
    return (Message.objects.filter(pk__in=Subquery(asked))
            .exclude(question_embedding__embedding_model=model_id()).order_by("-created_at", "-id"))


def unanswered_questions_embed(*, limit: int | None = EMBED_RUN_MAX, batch_size: int = EMBED_BATCH) -> int:
    """Embed, with the real embedding model (``knowledge.embedding.get_embedding_model``), the
    questions ``questions_without_embedding`` returns, newest first, at most ``limit`` (``None``: all),
    ``batch_size`` per model call, and store them (``question_embedding_store``'s upsert, one query
    per batch). Returns how many were stored. Safe to run twice or concurrently (upserts of the same
    vectors). Meant for a Celery worker, never a web request: it holds the embedding lock per batch."""
    from knowledge.embedding import get_embedding_model, model_id

    pending = questions_without_embedding().values_list("pk", "text")
    rows = list(pending if limit is None else pending[:limit])
    current = model_id()
    stored = 0
    for first in range(0, len(rows), batch_size):
        batch = rows[first: first + batch_size]
        vectors = get_embedding_model().encode([text.strip() for _, text in batch])
        QuestionEmbedding.objects.bulk_create(
            [QuestionEmbedding(message_id=pk, embedding=vector, embedding_model=current)
             for (pk, _), vector in zip(batch, vectors)],
            update_conflicts=True, unique_fields=["message"], update_fields=["embedding", "embedding_model"],
        )
        stored += len(batch)
    return stored
