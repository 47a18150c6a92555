"""Analytics reads for the dashboard: volumes, outcomes, feedback, time to first token, the
groundedness check's method mix and removed sentences, and the content gaps (the questions the
knowledge base could not answer, grouped by similarity).

Content-gap grouping is greedy leader clustering on the questions' stored sentence embeddings
(``chat.models.QuestionEmbedding``: the vector retrieval computed, kept when the bot abstained, or
computed later by a Celery worker; unit vectors, so a dot product is the cosine similarity); the
page never runs the embedding model. Each question joins the first group whose leader is at least
``GAP_SIMILARITY`` similar, else it starts a group. Simple, order-dependent, and good enough for "what to write next".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from django.db import connection
from django.db.models import Count, Exists, IntegerField, OuterRef, Q, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, TruncDate
from django.utils import timezone

from chat.models import AnswerFeedback, Conversation, Message
from chat.selectors import answered_question

GAP_SIMILARITY = 0.7
GAP_MAX_QUESTIONS = 500


@dataclass
class QuestionGroup:
    """Similar unanswered questions: ``leader`` the first one seen, ``questions`` all of them (with
    repeats), ``count`` how many."""

    leader: str
    questions: list[str]

    @property
    def count(self) -> int:
        return len(self.questions)

    @property
    def examples(self) -> list[str]:
        """Up to 5 distinct questions of the group."""
        return list(dict.fromkeys(self.questions))[:5]


def conversations_per_day(*, days: int = 30) -> list[tuple]:
    """``[(date, count)]`` for each of the last ``days`` days (oldest first, zero-filled), by
    conversation start in the current time zone."""
    today = timezone.localdate()
    start = today - timedelta(days=days - 1)
    counts = dict(
        Conversation.objects.filter(created_at__date__gte=start)
        .annotate(day=TruncDate("created_at")).values("day").annotate(n=Count("id")).values_list("day", "n")
    )
    return [(start + timedelta(days=i), counts.get(start + timedelta(days=i), 0)) for i in range(days)]


def answer_outcomes() -> dict:
    """``{"answered": int, "abstained": int, "handed_off": int, "resolved_without_agent": int,
    "conversations": int}``: assistant answers given and declined; conversations handed to a human
    (status ``needs_human``/``agent`` now, or an agent message, a handoff request or a takeover ever:
    ``Message.kind``); resolved conversations never handed to a human that way (an agent may have
    clicked "resolve" without taking the conversation over)."""
    answers = Message.objects.filter(role=Message.Role.ASSISTANT)
    own = Message.objects.filter(conversation=OuterRef("pk"))
    human = own.filter(Q(role=Message.Role.AGENT) | Q(kind__in=[Message.Kind.HANDOFF, Message.Kind.TAKEOVER]))
    handed_off = Conversation.objects.filter(
        Q(status__in=[Conversation.Status.NEEDS_HUMAN, Conversation.Status.AGENT]) | Exists(human)
    )
    return {
        "answered": answers.filter(abstained=False).count(),
        "abstained": answers.filter(abstained=True).count(),
        "handed_off": handed_off.count(),
        "resolved_without_agent": Conversation.objects.filter(status=Conversation.Status.RESOLVED)
        .exclude(Exists(human)).count(),
        "conversations": Conversation.objects.count(),
    }


def feedback_summary() -> dict:
    """``{"up": int, "down": int, "thumbs_down_rate": float | None}`` (rate = down / (up + down))."""
    counts = dict(AnswerFeedback.objects.values("value").annotate(n=Count("id")).values_list("value", "n"))
    up, down = counts.get("up", 0), counts.get("down", 0)
    return {"up": up, "down": down, "thumbs_down_rate": down / (up + down) if up + down else None}


def grounding_summary() -> dict:
    """The groundedness check over the assistant answers that carry its record (answers from before
    the check, ``grounding == {}``, are not counted): ``{"checked": int, "generated": int,
    "extractive": int, "curated": int (approved corrections served), "declined": int, "with_removed": int (answers from which the check removed at
    least one sentence), "removed_sentences": int (sentences removed in all), "removed_percent": int
    | None (with_removed / checked, rounded percent; None when nothing was checked)}``. One query."""
    method = "grounding__method"
    row = Message.objects.filter(role=Message.Role.ASSISTANT, grounding__has_key="method").aggregate(
        checked=Count("id"),
        generated=Count("id", filter=Q(**{method: "generated"})),
        extractive=Count("id", filter=Q(**{method: "extractive"})),
        curated=Count("id", filter=Q(**{method: "curated"})),
        declined=Count("id", filter=Q(**{method: "declined"})),
        with_removed=Count("id", filter=Q(grounding__removed__gt=0)),
        removed_sentences=Coalesce(Sum(Cast(KT("grounding__removed"), IntegerField())), 0),
    )
    row["removed_percent"] = round(100 * row["with_removed"] / row["checked"]) if row["checked"] else None
    return row


def ttft_percentiles() -> dict:
    """``{"p50_ms": float | None, "p95_ms": float | None, "n": int}``: time to first token of the
    model's answers (abstentions excluded), continuous percentiles computed by Postgres."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY (timings->>'ttft_ms')::float), "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY (timings->>'ttft_ms')::float), count(*) "
            "FROM chat_message WHERE role = 'assistant' AND NOT abstained AND timings ? 'ttft_ms'"
        )
        p50, p95, n = cursor.fetchone()
    return {"p50_ms": p50, "p95_ms": p95, "n": n}


@dataclass
class ContentGaps:
    """The content gaps the analytics page shows: ``groups`` (``QuestionGroup``, largest first) of the
    unanswered questions that have a stored vector of the current embedding model, and ``pending``,
    how many of the latest unanswered questions are not grouped yet because their vector has not
    been computed (``chat.embed_unanswered_questions`` does it in a worker)."""

    groups: list[QuestionGroup]
    pending: int


def unanswered_questions(*, limit: int = GAP_MAX_QUESTIONS) -> list[tuple[str, np.ndarray | None]]:
    """The customer questions the bot abstained on, newest first (at most ``limit``), each as
    ``(text, embedding)``: ``embedding`` the stored vector of the current embedding model
    (``chat.models.QuestionEmbedding``, float32 unit vector) or ``None`` when it has not been computed
    yet. Which question an abstention replied to: ``chat.selectors.answered_question``. Two queries
    however many questions; the embedding model is not used."""
    from knowledge.embedding import model_id

    question_ids = list(
        Message.objects.filter(role=Message.Role.ASSISTANT, abstained=True).order_by("-created_at", "-id")
        .annotate(question_id=answered_question()).values_list("question_id", flat=True)[:limit]
    )
    question_ids = [pk for pk in dict.fromkeys(question_ids) if pk is not None]
    current = model_id()
    rows = {
        pk: (text, embedding if embedding is not None and embedding_model == current else None)
        for pk, text, embedding, embedding_model in Message.objects.filter(pk__in=question_ids).values_list(
            "pk", "text", "question_embedding__embedding", "question_embedding__embedding_model")
    }
    return [(rows[pk][0], None if rows[pk][1] is None else np.asarray(rows[pk][1], dtype=np.float32))
            for pk in question_ids if pk in rows]


def group_questions(questions: list[str], embeddings: np.ndarray, *, threshold: float = GAP_SIMILARITY) -> list[QuestionGroup]:
    """Greedy leader clustering: ``embeddings`` (shape ``(len(questions), dim)``, unit rows) row ``i``
    belongs to ``questions[i]``; a question joins the first group whose leader's cosine similarity
    is at least ``threshold``. Groups largest first (ties: first seen first)."""
    groups: list[QuestionGroup] = []
    embeddings = np.asarray(embeddings, dtype=np.float32)
    leaders = np.empty((len(questions), embeddings.shape[1] if embeddings.ndim == 2 else 0), dtype=np.float32)
    for question, vector in zip(questions, embeddings):
        if groups:
            similarities = leaders[: len(groups)] @ vector
            best = int(np.argmax(similarities))
            if similarities[best] >= threshold:
                groups[best].questions.append(question)
                continue
        leaders[len(groups)] = vector
        groups.append(QuestionGroup(leader=question, questions=[question]))
    return sorted(groups, key=lambda g: -g.count)


def content_gaps(*, top: int = 10, threshold: float = GAP_SIMILARITY) -> ContentGaps:
    """The ``top`` largest groups of unanswered questions (``unanswered_questions`` grouped by
    ``group_questions`` on their stored vectors), and how many of those questions wait for a vector.
    Reads only: no embedding model, no embedding lock (the vectors are computed by the answer
    pipeline and ``chat.services.unanswered_questions_embed``)."""
    questions = unanswered_questions()
    embedded = [(text, vector) for text, vector in questions if vector is not None]
    if not embedded:
        return ContentGaps(groups=[], pending=len(questions))
    groups = group_questions([text for text, _ in embedded], np.stack([v for _, v in embedded]), threshold=threshold)
    return ContentGaps(groups=groups[:top], pending=len(questions) - len(embedded))


def bar_chart(values: list[tuple[str, float]], *, width: int = 600, height: int = 160) -> dict:
    """Geometry of a vertical bar chart drawn as inline SVG by the template: ``{"width", "height",
    "bars": [{"x", "y", "w", "h", "label", "value"}], "max"}`` (SVG user units; labels are escaped by
    the template)."""
    peak = max((v for _, v in values), default=0) or 1
    step = width / max(len(values), 1)
    bars = []
    for i, (label, value) in enumerate(values):
        h = round((height - 20) * value / peak, 1)
        bars.append({"x": round(i * step + 1, 1), "y": round(height - 20 - h, 1), "w": round(max(step - 2, 1), 1),
                     "h": h, "label": label, "value": value})
    return {"width": width, "height": height, "bars": bars, "max": peak}


def hbar_chart(values: list[tuple[str, float]], *, width: int = 600, row: int = 26) -> dict:
    """Geometry of a horizontal bar chart: ``{"width", "height", "bars": [{"y", "w", "label",
    "value"}]}``, bars starting at x = 180."""
    peak = max((v for _, v in values), default=0) or 1
    bars = [{"y": i * row, "w": round((width - 240) * value / peak, 1), "label": label, "value": value}
            for i, (label, value) in enumerate(values)]
    return {"width": width, "height": row * len(values), "bars": bars}
