"""The groundedness check in the agent dashboard: each answer's method and reason, how its question
was retrieved, every sentence the check removed (marked as never shown to the customer), the
"Removed sentences" and "Quoted from a source" inbox filters, and escaping of model output."""

from __future__ import annotations

import pytest
from django.test import Client

from chat import agent_selectors, analytics
from chat.agent_selectors import GroundingDetail
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'
XSS_ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"

INVENTED = "Refunds arrive by courier within 2 hours [1]."
BESIDE = "Express shipping costs 15 dollars [2]."


@pytest.fixture
def client(agent) -> Client:
    client = Client()
    client.force_login(agent)
    return client


def grounding(method: str, sentences: list[dict], **extra) -> dict:
    """A ``Message.grounding`` record as ``chat.services.answer_compose`` stores it."""
    return {"method": method, "reason": None, "query": "q", "follow_up": None, "question_distance": 0.3,
            "sentences": sentences, "removed": sum(not s["shown"] for s in sentences), **extra}


def sentence(text: str, *, shown: bool, reason: str | None = None, source: int | None = None,
             coverage: float = 0.0, similarity: float = 0.0) -> dict:
    return {"text": text, "shown": shown, "reason": reason, "source": source, "coverage": coverage,
            "similarity": similarity}


def answered(conversation: Conversation, question: str, answer: str, record: dict, **fields) -> Message:
    Message.objects.create(conversation=conversation, role="user", text=question)
    return Message.objects.create(conversation=conversation, role="assistant", text=answer, grounding=record, **fields)


@pytest.fixture
def follow_up_answer(conversation, knowledge) -> Message:
    """In the scripted conversation, a follow-up retrieved with its history and answered by the model:
    one sentence shown, one removed for an invented fact (before any source comparison), one removed
    as unsupported by source [2]."""
    refunds = knowledge["refunds"]
    return answered(
        conversation, "And for them?", "Refunds take five business days [1].",
        {"method": "generated", "reason": None, "query": "How long do refunds take? And for them?",
         "follow_up": "refers back", "question_distance": 0.734512, "removed": 2, "sentences": [
             sentence("Refunds take five business days [1].", shown=True, source=1, coverage=1.0, similarity=0.97),
             sentence(INVENTED, shown=False, reason="not in the sources: 2 hours"),
             sentence(BESIDE, shown=False, reason="not supported by the sources (coverage 0.25, similarity 0.41)",
                      source=2, coverage=0.25, similarity=0.412),
         ]},
        citations=[{"n": 1, "chunk_id": refunds.pk, "source_id": refunds.source_id, "source_title": "Returns",
                    "start": refunds.start, "end": refunds.end, "method": "model"}],
        retrieval=[{"chunk_id": refunds.pk, "source_id": refunds.source_id, "score": 0.03, "vector_distance": 0.2,
                    "text_rank": None},
                   {"chunk_id": knowledge["express"].pk, "source_id": knowledge["express"].source_id, "score": 0.02,
                    "vector_distance": 0.4, "text_rank": None}],
    )


def test_removed_sentences_and_quoted_filters_keep_exactly_their_conversations(conversation, django_assert_num_queries):
    # given: the scripted conversation (an answer from before the check, grounding {}), and
    kept = Conversation.objects.create()  # a generated answer with nothing removed
    answered(kept, "How long do refunds take?", "Five days [1].",
             grounding("generated", [sentence("Five days [1].", shown=True, source=1, coverage=1.0, similarity=0.9)]))
    quoted = Conversation.objects.create()  # the model's two sentences removed, a source sentence quoted
    answered(quoted, "Do you ship to Canada?", "We ship to Canada and the US. [1]",
             grounding("extractive", [sentence("See example.com.", shown=False, reason="not in the sources: example.com"),
                                      sentence("Yes.", shown=False, reason="too short to check")],
                       reason="no sentence passed the check", relevance=0.71))
    quoted_first = Conversation.objects.create()  # quoted at once, the model never asked: nothing removed
    answered(quoted_first, "Is express shipping available?", "Express shipping costs 15 dollars. [1]",
             grounding("extractive", [], reason="a source sentence answers the question", relevance=0.8))
    declined = Conversation.objects.create()  # declined for weak retrieval: nothing written, nothing removed
    answered(declined, "What is the capital of France?", "I couldn't find this.",
             grounding("declined", [], reason="weak retrieval"), abstained=True)
    twice = Conversation.objects.create()  # two answers with removed sentences: 1 + 2 removed
    answered(twice, "Refunds?", "Five days [1].",
             grounding("generated", [sentence("Five days [1].", shown=True, source=1),
                                     sentence("Call 555-0100.", shown=False, reason="not in the sources: 555-0100")]))
    answered(twice, "And returns?", "I couldn't find this.",
             grounding("declined", [sentence("Maybe.", shown=False, reason="too short to check"),
                                    sentence("Ask us.", shown=False, reason="too short to check")],
                       reason="no sentence passed the check"), abstained=True)

    def ids(**kwargs):
        return [c.pk for c in agent_selectors.inbox_list(**kwargs)]

    # when/then: each filter keeps exactly its conversations, newest activity first
    assert ids(filters=["removed_sentences"]) == [twice.pk, quoted.pk]
    assert ids(filters=["quoted"]) == [quoted_first.pk, quoted.pk]
    assert ids(filters=["removed_sentences", "quoted"]) == [quoted.pk]
    assert ids(filters=["removed_sentences", "abstained"]) == [twice.pk]
    # and every row counts the sentences removed over all its answers, 0 when none (or no record)
    assert {c.pk: c.removed_count for c in agent_selectors.inbox_list()} == {
        conversation.pk: 0, kept.pk: 0, quoted.pk: 2, quoted_first.pk: 0, declined.pk: 0, twice.pk: 3}
    # and the whole filtered list, with its counts, is one query
    with django_assert_num_queries(1):
        list(agent_selectors.inbox_list(filters=["removed_sentences", "quoted"]))


def test_inbox_page_offers_the_filters_and_flags_removed_sentences(client, follow_up_answer, conversation):
    # given the follow-up answer (2 sentences removed) and a conversation without any
    other = Conversation.objects.create()
    answered(other, "Hi", "Hello!", grounding("generated", [sentence("Hello!", shown=True, source=1)]))
    # when the inbox is filtered on removed sentences
    html = client.get("/dashboard/?filter=removed_sentences").content.decode()
    # then the filter is offered (and checked), and only the conversation with removals is listed, flagged
    assert '<input type="checkbox" name="filter" value="removed_sentences" checked> Removed sentences' in html
    assert '<input type="checkbox" name="filter" value="quoted" > Quoted from a source' in html
    assert f'data-conversation-id="{conversation.pk}"' in html
    assert f'data-conversation-id="{other.pk}"' not in html
    assert '<span class="flag">removed sentences ×2</span>' in html
    # and without the filter the other conversation is listed, with no such flag
    unfiltered = client.get("/dashboard/inbox/list/").content.decode()
    assert f'data-conversation-id="{other.pk}"' in unfiltered
    assert unfiltered.count("removed sentences ×") == 1


def test_conversation_detail_builds_the_grounding_display_data(follow_up_answer, conversation):
    # when the conversation's details are read
    _, _, details = agent_selectors.conversation_detail(conversation.pk)
    # then the follow-up answer's record is ready to display: method, retrieval, removed sentences with
    # their position among the model's sentences and the title of the source they were checked against
    assert details[follow_up_answer.pk].grounding == GroundingDetail(
        method="generated", method_label="Generated by the model", reason=None, relevance=None,
        retrieval_label="the question and the conversation history, because it refers back to the conversation",
        query="How long do refunds take? And for them?", question_distance=0.734512, sentence_count=3,
        removed=[
            {"n": 2, "text": INVENTED, "reason": "not in the sources: 2 hours", "source": None, "source_title": "",
             "coverage": None, "similarity": None},
            {"n": 3, "text": BESIDE, "reason": "not supported by the sources (coverage 0.25, similarity 0.41)",
             "source": 2, "source_title": "Shipping", "coverage": 0.25, "similarity": 0.412},
        ],
    )
    # and the answer from before the check has no record
    old = conversation.messages.get(text="Refunds take ten days [1].")
    assert details[old.pk].grounding is None


def test_grounding_detail_of_a_quoted_and_a_declined_answer():
    # given a quoted answer retrieved on the question's own words, and a declined one without retrieval
    quoted = grounding("extractive", [], reason="a source sentence answers the question", relevance=0.812)
    declined = {"method": "declined", "reason": "the model's answer was empty", "sentences": [], "removed": 0}
    # when/then
    assert agent_selectors.grounding_detail(quoted, []) == GroundingDetail(
        method="extractive", method_label="Quoted from a source", reason="a source sentence answers the question",
        relevance=0.812, retrieval_label="the question alone", query=None, question_distance=None,
        sentence_count=0, removed=[])
    assert agent_selectors.grounding_detail(declined, []) == GroundingDetail(
        method="declined", method_label="Declined", reason="the model's answer was empty", relevance=None,
        retrieval_label=None, query=None, question_distance=None, sentence_count=0, removed=[])
    assert agent_selectors.grounding_detail({}, []) is None


def test_conversation_page_shows_method_retrieval_and_removed_sentences_never_shown(client, follow_up_answer, conversation):
    # when an agent opens the conversation
    html = client.get(f"/dashboard/conversations/{conversation.pk}/").content.decode()
    # then the answer's method, how it was retrieved, and the removed sentences with reasons are shown
    assert '<span class="method">Generated by the model</span>' in html
    assert ("Retrieved with the question and the conversation history, because it refers back to the conversation: "
            "<q>How long do refunds take? And for them?</q>") in html
    assert "(the question alone: closest chunk at cosine distance 0.735)" in html
    assert ("Removed by the groundedness check, never shown to the customer: 2 of the model's 3 sentences"
            in html)
    assert (f'<li class="removed-sentence" value="2"><span class="removed-text">{INVENTED}</span>\n'
            '          <div class="muted">Reason: <span class="removed-reason">not in the sources: 2 hours</span></div></li>'
            in html)
    assert (f'<li class="removed-sentence" value="3"><span class="removed-text">{BESIDE}</span>\n'
            '          <div class="muted">Reason: <span class="removed-reason">not supported by the sources '
            "(coverage 0.25, similarity 0.41)</span> · checked against source [2] Shipping: "
            "coverage 0.25, similarity 0.41</div></li>") in html
    # and the removed text appears only there: not in the transcript as something the customer read
    assert html.count(INVENTED) == 1 and html.count(BESIDE) == 1
    # and the fixture's two answers from before the check (greeting, refunds) say they have no record
    assert html.count("No groundedness record (answered before the check).") == 2


def test_conversation_page_shows_a_quoted_answer_with_its_reason(client, conversation, knowledge):
    # given a question answered by quoting a source sentence after the model's only sentence was removed
    express = knowledge["express"]
    answered(conversation, "What does express cost?", "Express shipping costs 15 dollars. [1]",
             grounding("extractive", [sentence("It costs 20 euros.", shown=False, reason="not in the sources: 20 euros")],
                       reason="no sentence passed the check", relevance=0.764),
             citations=[{"n": 1, "chunk_id": express.pk, "source_id": express.source_id, "source_title": "Shipping",
                         "start": express.start, "end": express.end, "method": "extractive"}])
    # when the transcript fragment is rendered
    html = client.get(f"/dashboard/conversations/{conversation.pk}/transcript/").content.decode()
    # then
    assert ('<div><span class="method">Quoted from a source</span> <span class="grounding-reason">— no sentence '
            'passed the check</span> <span class="muted">(relevance 0.764)</span></div>') in html
    assert '<div class="retrieved-with">Retrieved with the question alone</div>' in html
    assert f"[1] Shipping (chunk {express.pk}, chars {express.start}–{express.end}, quoted)" in html
    assert "never shown to the customer: 1 of the model's 1 sentence</div>" in html


def test_model_output_in_removed_sentences_is_rendered_as_text(client, conversation):
    # given an answer whose removed sentence, its reason and the retrieval query carry HTML/JS payloads
    answered(conversation, "And?", "I couldn't find this.",
             {**grounding("declined", [sentence(XSS, shown=False, reason=f"not in the sources: {XSS}", source=1,
                                                coverage=0.1, similarity=0.2)], reason=XSS),
              "follow_up": "refers back", "query": XSS}, abstained=True)
    # when the conversation and its transcript fragment are rendered
    pages = [client.get(f"/dashboard/conversations/{conversation.pk}/").content.decode(),
             client.get(f"/dashboard/conversations/{conversation.pk}/transcript/").content.decode()]
    # then each payload appears escaped (sentence, its reason, the answer's reason, the query), never as markup
    for html in pages:
        assert html.count(XSS_ESCAPED) == 4
        assert "<script>alert" not in html
        assert "<img src=x" not in html


def test_grounding_summary_counts_methods_and_removed_sentences(conversation):
    # given: the scripted conversation's two answers from before the check (not counted), and four
    # checked answers: generated with 1 removed, generated clean, quoted with 2 removed, declined
    other = Conversation.objects.create()
    answered(other, "a?", "A [1].", grounding("generated", [sentence("A [1].", shown=True, source=1),
                                                            sentence("B 5 km.", shown=False, reason="not in the sources: 5 km")]))
    answered(other, "b?", "C [1].", grounding("generated", [sentence("C [1].", shown=True, source=1)]))
    answered(other, "c?", "D. [1]", grounding("extractive", [sentence("E.", shown=False, reason="too short to check"),
                                                             sentence("F?", shown=False, reason="a question, not an answer")]))
    answered(other, "d?", "I couldn't find this.", grounding("declined", [], reason="weak retrieval"), abstained=True)
    # when/then
    assert analytics.grounding_summary() == {"checked": 4, "generated": 2, "extractive": 1, "curated": 0, "declined": 1,
                                             "with_removed": 2, "removed_sentences": 3, "removed_percent": 50}


def test_grounding_summary_without_checked_answers(conversation):
    # given only answers from before the check; when/then nothing is counted and there is no percentage
    assert analytics.grounding_summary() == {"checked": 0, "generated": 0, "extractive": 0, "curated": 0, "declined": 0,
                                             "with_removed": 0, "removed_sentences": 0, "removed_percent": None}


def test_analytics_page_shows_the_method_mix_and_links_removed_sentences_to_the_inbox(client, follow_up_answer):
    # given the follow-up answer (generated, 2 of 3 sentences removed) and a quoted answer
    answered(follow_up_answer.conversation, "Express?", "Express shipping costs 15 dollars. [1]",
             grounding("extractive", [], reason="a source sentence answers the question", relevance=0.8))
    # when the analytics page renders
    html = client.get("/dashboard/analytics/").content.decode()
    # then
    assert '<dd id="stat-methods">generated 1 · quoted from a source 1 · declined 0</dd>' in html
    assert ('<dd id="stat-removed"><a href="/dashboard/?filter=removed_sentences">50% (1 of 2)</a>, '
            "2 sentences never shown</dd>") in html
