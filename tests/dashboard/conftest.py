"""Dashboard fixtures: users (two agents, a staff member, a logged-in customer who is no agent) and
a conversation with a scripted transcript (no model needed), on the real Postgres."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User

from chat.access import AGENTS_GROUP
from chat.models import Conversation, Message
from knowledge.models import Chunk, Source

EMBEDDING = [0.0] * 383 + [1.0]


def make_agent(username: str) -> User:
    user = User.objects.create_user(username, password="pw-" + username)
    user.groups.add(Group.objects.get_or_create(name=AGENTS_GROUP)[0])  # transactional tests flush it
    return user


@pytest.fixture
def agent(db) -> User:
    return make_agent("alice")


@pytest.fixture
def agent2(db) -> User:
    return make_agent("bob")


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("sam", password="pw-sam", is_staff=True)


@pytest.fixture
def customer_user(db) -> User:
    """Logged in, but neither staff nor in the Agents group."""
    return User.objects.create_user("carol", password="pw-carol")


def make_source(title: str, text: str, *, content_hash: str = "hash-v1", uri: str | None = None) -> Source:
    """A ready source with one chunk per paragraph (offsets into ``text``)."""
    source = Source.objects.create(uri=uri or f"{title}.md", title=title, text=text, content_hash=content_hash,
                                   status=Source.Status.READY)
    start = 0
    for ordinal, paragraph in enumerate(text.split("\n\n")):
        begin = text.index(paragraph, start)
        Chunk.objects.create(source=source, ordinal=ordinal, start=begin, end=begin + len(paragraph), text=paragraph,
                             embedding=EMBEDDING, embedding_model="test-model")
        start = begin + len(paragraph)
    return source


RETURNS_TEXT = "Refunds take five business days.\n\nReturns are free within 30 days."
SHIPPING_TEXT = "We ship to Canada and the US.\n\nExpress shipping costs 15 dollars."


@pytest.fixture
def knowledge(db) -> dict:
    """Two sources: "Returns" (chunks: refunds, returns) and "Shipping" (chunks: countries, express)."""
    returns = make_source("Returns", RETURNS_TEXT)
    shipping = make_source("Shipping", SHIPPING_TEXT)
    return {"returns": returns, "shipping": shipping,
            "refunds": returns.chunks.get(ordinal=0), "free_returns": returns.chunks.get(ordinal=1),
            "countries": shipping.chunks.get(ordinal=0), "express": shipping.chunks.get(ordinal=1)}


@pytest.fixture
def conversation(knowledge) -> Conversation:
    """A conversation: greeting exchange, then "How long do refunds take?" answered citing [1]."""
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="user", text="Hi there")
    Message.objects.create(conversation=conversation, role="assistant", text="Hello! How can I help?", abstained=False)
    Message.objects.create(conversation=conversation, role="user", text="How long do refunds take?")
    refunds, free, countries = knowledge["refunds"], knowledge["free_returns"], knowledge["countries"]
    Message.objects.create(
        conversation=conversation, role="assistant", text="Refunds take ten days [1].",
        citations=[{"n": 1, "chunk_id": refunds.pk, "source_id": refunds.source_id, "source_title": "Returns",
                    "start": refunds.start, "end": refunds.end}],
        retrieval=[
            {"chunk_id": refunds.pk, "source_id": refunds.source_id, "score": 0.032787, "vector_distance": 0.21, "text_rank": 0.5},
            {"chunk_id": free.pk, "source_id": free.source_id, "score": 0.031746, "vector_distance": 0.35, "text_rank": None},
            {"chunk_id": countries.pk, "source_id": countries.source_id, "score": 0.016129, "vector_distance": 0.58, "text_rank": None},
            {"chunk_id": knowledge["express"].pk, "source_id": countries.source_id, "score": 0.015873, "vector_distance": 0.61, "text_rank": None},
        ],
        timings={"retrieval_ms": 12.5, "ttft_ms": 340.2, "generation_ms": 800.0, "tokens": 9, "tokens_per_s": 11.3},
    )
    return conversation
