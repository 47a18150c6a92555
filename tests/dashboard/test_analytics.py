"""The analytics page's content gaps: unanswered questions grouped on their stored vectors, read with
a fixed number of queries and without the embedding model; and the worker job that stores the
vectors the pipeline did not (``chat.services.unanswered_questions_embed``)."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from chat import analytics, services
from chat.models import Conversation, Message, QuestionEmbedding
from knowledge import embedding as embedding_module

pytestmark = pytest.mark.django_db

DIM = 384


def unit(*hot: int) -> np.ndarray:
    """A unit vector of ``DIM`` floats with equal weight on the indexes ``hot``."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[list(hot)] = 1.0
    return vector / np.linalg.norm(vector)


def abstained(question: str, vector: np.ndarray | None = None, *, model: str | None = None) -> Message:
    """A conversation where ``question`` was declined; its vector stored when given (of ``model``,
    default the current embedding model). Returns the question message."""
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="user", text="Hello")
    Message.objects.create(conversation=conversation, role="assistant", text="Hi!")
    asked = Message.objects.create(conversation=conversation, role="user", text=question)
    Message.objects.create(conversation=conversation, role="assistant", text="I couldn't find this.", abstained=True)
    if vector is not None:
        QuestionEmbedding.objects.create(message=asked, embedding=vector,
                                         embedding_model=model or embedding_module.model_id())
    return asked


@pytest.fixture
def no_embedding_model(monkeypatch):
    """Any use of the embedding model fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the embedding model was used")

    monkeypatch.setattr(embedding_module, "get_embedding_model", refuse)
    monkeypatch.setattr(embedding_module.EmbeddingModel, "encode", refuse)


@pytest.fixture
def client(agent) -> Client:
    client = Client()
    client.force_login(agent)
    return client


def test_content_gaps_group_stored_vectors_without_the_embedding_model(no_embedding_model):
    # given, oldest first: three kayak questions, one about gift cards, and one without a vector yet
    abstained("Do you rent kayaks?", unit(0))
    abstained("Gift cards?", unit(5))
    abstained("Kayak hire?", unit(0, 1, 2, 3))
    abstained("Kayaks for rent?", unit(0, 1))
    abstained("Where is my parcel?")
    # when the content gaps are read
    gaps = analytics.content_gaps()
    # then the newest embedded question leads; both other kayak questions are at cosine 0.707 from it
    # (GAP_SIMILARITY 0.7); the question without a vector is counted as pending, not grouped
    assert [(g.leader, g.questions) for g in gaps.groups] == [
        ("Kayaks for rent?", ["Kayaks for rent?", "Kayak hire?", "Do you rent kayaks?"]),
        ("Gift cards?", ["Gift cards?"]),
    ]
    assert gaps.pending == 1


def test_content_gaps_groups_are_exact(no_embedding_model):
    # given, oldest first: A (0), B close to A (cos 0.8), C orthogonal, D close to A (cos 0.8)
    a, b, c, d = unit(0), np.zeros(DIM, np.float32), unit(1), np.zeros(DIM, np.float32)
    b[0], b[2] = 0.8, 0.6
    d[0], d[3] = 0.8, 0.6
    for text, vector in [("A?", a), ("B?", b), ("C?", c), ("D?", d)]:
        abstained(text, vector)
    # when grouped (newest first: D leads, A joins it at 0.8, B is 0.64 from D so it leads its own)
    gaps = analytics.content_gaps()
    # then
    assert [(g.leader, g.questions) for g in gaps.groups] == [("D?", ["D?", "A?"]), ("C?", ["C?"]), ("B?", ["B?"])]
    assert gaps.pending == 0


def test_the_analytics_page_reads_content_gaps_in_queries_that_do_not_grow_with_the_questions(
        client, no_embedding_model):
    # given 3 unanswered questions, the page's query count
    for i in range(3):
        abstained(f"Question {i}?", unit(i))
    with CaptureQueriesContext(connection) as few:
        assert client.get("/dashboard/analytics/").status_code == 200
    # when 12 more are added (and one without a vector)
    for i in range(3, 15):
        abstained(f"Question {i}?", unit(i))
    abstained("Not embedded yet?")
    with CaptureQueriesContext(connection) as many:
        html = client.get("/dashboard/analytics/").content.decode()
    # then the page lists them with the same number of queries, and says one waits for its vector
    assert len(many) == len(few)
    assert html.count("<li><strong>1×</strong> Question ") == 10  # the top 10 groups
    assert '<p class="muted" id="gaps-pending">1 more question will be grouped once a worker has embedded it.</p>' in html


def test_the_worker_job_embeds_only_the_missing_and_the_other_models_questions(monkeypatch):
    # given: an unanswered question without a vector, one with a vector of another model, one of the
    # current model, and an answered question
    missing = abstained("Do you sell kayaks?")
    stale = abstained("Gift cards?", unit(7), model="old-model@384")
    current = abstained("Tents?", unit(9))
    answered = Conversation.objects.create()
    Message.objects.create(conversation=answered, role="user", text="Refunds?")
    Message.objects.create(conversation=answered, role="assistant", text="Five days.")
    embedded: list[list[str]] = []

    class FakeModel:
        def encode(self, texts):
            embedded.append(list(texts))
            return np.stack([unit(20 + len(text)) for text in texts])

    monkeypatch.setattr(embedding_module, "get_embedding_model", lambda: FakeModel())
    # when the job runs, then twice more
    stored = [services.unanswered_questions_embed(), services.unanswered_questions_embed()]
    # then the two questions were embedded once, newest first, and the current model's vector kept
    assert stored == [2, 0]
    assert embedded == [["Gift cards?", "Do you sell kayaks?"]]
    rows = {row.message_id: row for row in QuestionEmbedding.objects.all()}
    assert set(rows) == {missing.pk, stale.pk, current.pk}
    assert {row.embedding_model for row in rows.values()} == {embedding_module.model_id()}
    assert np.array_equal(np.asarray(rows[missing.pk].embedding), unit(20 + len("Do you sell kayaks?")))
    assert np.array_equal(np.asarray(rows[stale.pk].embedding), unit(20 + len("Gift cards?")))
    assert np.array_equal(np.asarray(rows[current.pk].embedding), unit(9))


def test_beat_runs_the_job():
    from django.conf import settings

    assert settings.CELERY_BEAT_SCHEDULE["chat.embed_unanswered_questions"] == {
        "task": "chat.embed_unanswered_questions", "schedule": settings.QUESTION_EMBEDDINGS_SWEEP_S}


def test_handoffs_are_counted_by_message_kind_not_wording():
    # given: a resolved conversation where the customer asked for a person (worded differently from
    # today's text), one an agent took over and resolved, and one resolved by the bot alone
    asked = Conversation.objects.create(status="resolved")
    Message.objects.create(conversation=asked, role="user", text="A person please")
    Message.objects.create(conversation=asked, role="system", kind="handoff", text="Customer wants a human.")
    taken = Conversation.objects.create(status="resolved")
    Message.objects.create(conversation=taken, role="user", text="Hello?")
    Message.objects.create(conversation=taken, role="system", kind="takeover", text="alice joined the conversation.")
    Message.objects.create(conversation=taken, role="system", kind="resolved", text="alice resolved the conversation.")
    alone = Conversation.objects.create(status="resolved")
    Message.objects.create(conversation=alone, role="user", text="Refunds?")
    Message.objects.create(conversation=alone, role="assistant", text="Five days.")
    Message.objects.create(conversation=alone, role="system", kind="resolved", text="bob resolved the conversation.")
    # when/then: the handoff and the takeover are handoffs; only the bot's conversation (resolved by
    # an agent who never wrote nor took it) is resolved without one
    outcomes = analytics.answer_outcomes()
    assert (outcomes["handed_off"], outcomes["resolved_without_agent"]) == (2, 1)


def test_the_migration_gives_existing_system_messages_their_kind_from_their_text():
    # given system messages stored before the kind field (the constraint lifted inside this test's
    # transaction, which is rolled back)
    import importlib

    from django.apps import apps

    migration = importlib.import_module("chat.migrations.0009_message_kind")
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE chat_message DROP CONSTRAINT message_kind_only_on_system")
    conversation = Conversation.objects.create()
    texts = ["The customer asked to talk to a person.", "Alice Smith joined the conversation.",
             "alice handed the conversation back to the assistant.", "bob resolved the conversation.", "handoff"]
    rows = [Message.objects.create(conversation=conversation, role="system", text=text) for text in texts]
    Message.objects.create(conversation=conversation, role="user", text="Bob resolved the conversation.")
    # when the migration's data step runs
    migration.kinds_from_text(apps, None)
    # then each has its kind (an unknown text counts as a handoff, as analytics counted it), users none
    assert [Message.objects.get(pk=m.pk).kind for m in rows] == ["handoff", "takeover", "hand_back", "resolved", "handoff"]
    assert Message.objects.get(role="user").kind == ""
