"""Inbox filters and search, the conversation view's retrieval details, XSS escaping, customer
feedback endpoints and the analytics page."""

from __future__ import annotations

import json

import numpy as np
import pytest
from django.test import Client

from chat import agent_selectors
from chat.analytics import group_questions
from chat.models import AnswerFeedback, Conversation, ConversationRating, Message

pytestmark = pytest.mark.django_db

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def client(agent) -> Client:
    client = Client()
    client.force_login(agent)
    return client


def test_inbox_filters_and_search(conversation):
    # given: the scripted conversation; one needing a human that abstained; one with thumbs down
    abstained = Conversation.objects.create(status="needs_human")
    Message.objects.create(conversation=abstained, role="user", text="Do you sell kayaks?")
    Message.objects.create(conversation=abstained, role="assistant", text="I couldn't find this.", abstained=True)
    down = Conversation.objects.create()
    Message.objects.create(conversation=down, role="user", text="Where is my parcel?")
    answer = Message.objects.create(conversation=down, role="assistant", text="No idea.",
                                    retrieval=[{"chunk_id": 1, "source_id": 1, "score": 0.01, "vector_distance": 0.55, "text_rank": None}])
    AnswerFeedback.objects.create(message=answer, value="down", comment="useless")

    def ids(**kwargs):
        return [c.pk for c in agent_selectors.inbox_list(**kwargs)]

    # when/then: each filter keeps exactly its conversations, newest activity first
    assert ids() == [down.pk, abstained.pk, conversation.pk]
    assert ids(filters=["needs_human"]) == [abstained.pk]
    assert ids(filters=["abstained"]) == [abstained.pk]
    assert ids(filters=["thumbs_down"]) == [down.pk]
    assert ids(filters=["weak_retrieval"]) == [down.pk]
    assert ids(query="KAYAK") == [abstained.pk]
    assert ids(query=str(conversation.pk)[:8]) == [conversation.pk]
    Conversation.objects.filter(pk=down.pk).update(reviewed_at="2025-01-01T00:00:00Z")
    assert ids(filters=["unreviewed"]) == [abstained.pk, conversation.pk]


def test_weak_retrieval_is_judged_on_each_answer_not_on_any_message_of_the_conversation():
    # given a conversation whose answer retrieved well and whose abstention retrieved weakly
    # (abstentions are not "weak retrieval" answers: they were not answered)
    mixed = Conversation.objects.create()
    Message.objects.create(conversation=mixed, role="user", text="Refunds?")
    Message.objects.create(conversation=mixed, role="assistant", text="Five days.",
                           retrieval=[{"chunk_id": 1, "vector_distance": 0.2}])
    Message.objects.create(conversation=mixed, role="user", text="Kayaks?")
    Message.objects.create(conversation=mixed, role="assistant", text="I couldn't find this.", abstained=True,
                           retrieval=[{"chunk_id": 2, "vector_distance": 0.9}])
    # when/then the weak-retrieval filter does not list it
    assert list(agent_selectors.inbox_list(filters=["weak_retrieval"])) == []


def test_conversation_view_shows_chunks_scores_citations_timings_and_model(client, conversation):
    # when an agent opens the conversation
    html = client.get(f"/dashboard/conversations/{conversation.pk}/").content.decode()
    # then the answer's retrieval trace, citation, timings and model are shown
    assert "Refunds take five business days." in html  # retrieved chunk text
    assert "0.0328" in html and "0.21" in html  # RRF score and cosine distance
    assert "[1] Returns" in html  # citation
    assert "TTFT 340.2 ms" in html and "11.3 tokens/s" in html and "retrieval 12.5 ms" in html
    assert "model: —" in html  # no model version recorded in the fixture
    assert html.count("shown</td>") + html.count("shown ·") == 3  # LLM_PROMPT_SOURCES = 3 shown to the model


def test_xss_in_customer_messages_is_rendered_as_text(client, conversation):
    # given a customer message and feedback comment carrying HTML/JS payloads
    Message.objects.create(conversation=conversation, role="user", text=XSS)
    answer = conversation.messages.filter(role="assistant").last()
    AnswerFeedback.objects.create(message=answer, value="down", comment=XSS)
    # when the inbox, the list fragment, the transcript and the conversation are rendered
    pages = [
        client.get("/dashboard/").content.decode(),
        client.get("/dashboard/inbox/list/").content.decode(),
        client.get(f"/dashboard/conversations/{conversation.pk}/").content.decode(),
        client.get(f"/dashboard/conversations/{conversation.pk}/transcript/").content.decode(),
    ]
    # then the payload appears escaped, never as markup
    for html in pages[2:]:
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    for html in pages:
        assert "<script>alert" not in html
        assert "<img src=x" not in html


def test_answer_feedback_and_rating_endpoints(conversation):
    client = Client()
    answer = conversation.messages.filter(role="assistant").last()
    url = f"/api/conversations/{conversation.pk}/messages/{answer.pk}/feedback/"
    # given the wrong token: refused, nothing stored
    bad = client.post(url, json.dumps({"value": "down"}), content_type="application/json", HTTP_X_CONVERSATION_TOKEN="nope")
    assert bad.status_code == 403
    assert AnswerFeedback.objects.count() == 0
    # when the customer rates the answer down with a comment, then it is stored
    ok = client.post(url, json.dumps({"value": "down", "comment": "It is five days"}), content_type="application/json",
                     HTTP_X_CONVERSATION_TOKEN=conversation.token)
    assert ok.status_code == 200
    assert ok.json() == {"message_id": answer.pk, "value": "down", "comment": "It is five days"}
    # a user message cannot be rated; a bad value is refused
    question = conversation.messages.filter(role="user").last()
    assert client.post(f"/api/conversations/{conversation.pk}/messages/{question.pk}/feedback/", json.dumps({"value": "up"}),
                       content_type="application/json", HTTP_X_CONVERSATION_TOKEN=conversation.token).status_code == 400
    assert client.post(url, json.dumps({"value": "meh"}), content_type="application/json",
                       HTTP_X_CONVERSATION_TOKEN=conversation.token).status_code == 400
    assert list(AnswerFeedback.objects.values_list("message_id", "value", "comment")) == [(answer.pk, "down", "It is five days")]
    # end-of-conversation rating
    rating_url = f"/api/conversations/{conversation.pk}/rating/"
    assert client.post(rating_url, json.dumps({"rating": 6}), content_type="application/json",
                       HTTP_X_CONVERSATION_TOKEN=conversation.token).status_code == 400
    assert client.post(rating_url, json.dumps({"rating": 4, "comment": "ok"}), content_type="application/json",
                       HTTP_X_CONVERSATION_TOKEN=conversation.token).json() == {"rating": 4, "comment": "ok"}
    assert list(ConversationRating.objects.values_list("rating", "comment")) == [(4, "ok")]


def test_group_questions_greedy_by_cosine():
    # given four unit vectors: two near each other, one orthogonal, one near the first
    questions = ["kayak rental?", "rent a kayak?", "gift cards?", "kayak hire?"]
    vectors = np.array([[1, 0], [0.96, 0.28], [0, 1], [0.9, 0.43589]], dtype=np.float32)
    # when grouped with threshold 0.8
    groups = group_questions(questions, vectors, threshold=0.8)
    # then the kayak questions form one group led by the first, largest first
    assert [(g.leader, g.count, g.questions) for g in groups] == [
        ("kayak rental?", 3, ["kayak rental?", "rent a kayak?", "kayak hire?"]),
        ("gift cards?", 1, ["gift cards?"]),
    ]


def test_analytics_page_numbers(client, conversation):
    # given one answered conversation resolved by nobody, thumbs down on its answer
    answer = conversation.messages.filter(role="assistant").last()
    AnswerFeedback.objects.create(message=answer, value="down")
    Conversation.objects.filter(pk=conversation.pk).update(status="resolved")
    # when the analytics page renders
    html = client.get("/dashboard/analytics/").content.decode()
    # then
    assert '<dd id="stat-answered">2</dd>' in html
    assert '<dd id="stat-abstained">0</dd>' in html
    assert '<dd id="stat-resolved-without-agent">1</dd>' in html
    assert '<dd id="stat-thumbs-down">100% (1 of 1)</dd>' in html
    assert "<dd id=\"stat-ttft\">340 ms / 340 ms (1 answers)</dd>" in html
    assert "<svg" in html


def test_the_conversation_page_shows_the_actions_flash_note_not_the_transcript_as_notes(client, conversation):
    # when an agent takes the conversation over (the view redirects back to the conversation)
    page = client.post(f"/dashboard/conversations/{conversation.pk}/take/", follow=True).content.decode()
    # then the flash list holds exactly the action's note (the transcript's messages stay in the transcript)
    flash = page.split('<ul class="flash">', 1)[1].split("</ul>", 1)[0]
    assert flash == '<li class="success">You have taken this conversation.</li>'
    assert page.count("How long do refunds take?") == 1


def test_xss_in_a_corrected_question_is_rendered_as_text_in_the_correction_pages(client, conversation, agent2):
    # given a customer question carrying markup, its answer, and a correction of that answer
    from tuning.services import correction_create

    Message.objects.create(conversation=conversation, role="user", text=XSS)
    answer = Message.objects.create(conversation=conversation, role="assistant", text="Sorry?")
    correction_create(answer.pk, author=agent2, corrected_answer=f"Fixed {XSS}", reason="tone")
    # when the correction form and the review queue are rendered
    pages = [client.get(f"/dashboard/corrections/answers/{answer.pk}/").content.decode(),
             client.get("/dashboard/corrections/").content.decode()]
    # then the question (and the corrected answer in the queue) appear escaped, never as markup
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert escaped in pages[0]
    assert f"Fixed {escaped}" in pages[1]
    for html in pages:
        assert "<script>alert" not in html and "<img src=x" not in html
