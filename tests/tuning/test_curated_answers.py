"""Curated answers: an approved correction answers close questions at once, citing the passages the
agent picked, and leaves the knowledge base in the same transaction as it is rejected or goes stale.

Sources are real files ingested for real (parser, chunker, the real embedding model, Postgres with
pgvector); questions go through the real answer pipeline (``chat.services.answer_stream``), which
serves a curated answer without asking the language model.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from django.test import Client

from chat.models import Conversation, Message
from chat.services import answer_stream
from knowledge import services as knowledge_services
from knowledge.embedding import get_embedding_model
from knowledge.models import Chunk, CuratedAnswer, CuratedEvidence, Source
from knowledge.selectors import chunk_search, curated_answer_match
from tuning import services
from tests.chat.conftest import fake_engine  # noqa: F401
from tuning.models import Correction

pytestmark = pytest.mark.django_db

RETURNS_V1 = "# Returns\n\nReturns are free within 30 days of delivery.\n"
RETURNS_V2 = "# Returns\n\nReturns are free within 14 days of delivery.\n"
WARRANTY = "# Warranty\n\nTents carry a two-year warranty against defects.\n"
QUESTION = "How long do I have to return an item?"
CORRECTED = "You can return it for free within 30 days of delivery [1]."
SERVED = "You can return it for free within 30 days of delivery. [1]"


def ingest(path: Path) -> int:
    (source,) = knowledge_services.sources_register_paths([path], enqueue=False).queued
    assert knowledge_services.document_ingest(source.pk).status == "ingested"
    return source.pk


@pytest.fixture
def kb(tmp_path, embedding_model) -> dict:
    """Two markdown files ingested for real: returns (its first chunk is the evidence) and warranty."""
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "returns.md").write_text(RETURNS_V1)
    (folder / "warranty.md").write_text(WARRANTY)
    returns, warranty = ingest(folder / "returns.md"), ingest(folder / "warranty.md")
    return {"returns": returns, "warranty": warranty, "returns_file": folder / "returns.md",
            "evidence": Chunk.objects.filter(source_id=returns).order_by("ordinal").first()}


def wrong_answer(question: str = QUESTION, history: tuple[str, ...] = ()) -> Message:
    """An assistant answer to ``question`` (after the customer turns ``history``) whose trace holds the
    warranty source only (the wrong passage)."""
    conversation = Conversation.objects.create()
    for text in history:
        Message.objects.create(conversation=conversation, role="user", text=text)
    Message.objects.create(conversation=conversation, role="user", text=question)
    warranty = Chunk.objects.filter(source__uri__endswith="warranty.md").first()
    return Message.objects.create(
        conversation=conversation, role="assistant", text="Tents carry a two-year warranty [1].",
        retrieval=[{"chunk_id": warranty.pk, "source_id": warranty.source_id, "score": 0.03,
                    "vector_distance": 0.4, "text_rank": None}],
    )


def approved(kb, agent, agent2, *, evidence: bool = True, **kwargs) -> Correction:
    correction = services.correction_create(
        wrong_answer(**kwargs).pk, author=agent, corrected_answer=CORRECTED, reason="wrong_fact",
        supporting_chunk_ids=[kb["evidence"].pk] if evidence else [],
    )
    return services.correction_review(correction.pk, reviewer=agent2, approve=True)


def ask(question: str) -> tuple[dict, Message]:
    """Ask ``question`` in a fresh conversation through the pipeline; returns ``({type: data}, stored
    answer)``."""
    conversation = Conversation.objects.create()
    events = {event.type: event.data for event in answer_stream(conversation.pk, question)}
    return events, conversation.messages.get(role="assistant")


def curated_state() -> tuple[int, int, int, int]:
    """(curated answers, curated sources, curated chunks, evidence rows) in the knowledge base."""
    return (CuratedAnswer.objects.count(), Source.objects.filter(kind="curated").count(),
            Chunk.objects.filter(source__kind="curated").count(), CuratedEvidence.objects.count())


def test_an_approved_correction_is_retrievable_and_served_with_its_evidence_cited(kb, agent, agent2):
    # given a pending correction of a wrong answer, citing the returns passage: nothing curated yet
    correction = services.correction_create(
        wrong_answer().pk, author=agent, corrected_answer=CORRECTED, reason="wrong_fact",
        supporting_chunk_ids=[kb["evidence"].pk])
    assert curated_state() == (0, 0, 0, 0)
    # when a second agent approves it
    correction = services.correction_review(correction.pk, reviewer=agent2, approve=True)
    # then it is a curated answer of the conversation's collection, its chunk the answer (markers
    # removed) under the question, embedded from the question alone
    curated = CuratedAnswer.objects.get()
    assert (correction.curated_answer_id, correction.curation_note) == (curated.pk, "")
    assert (curated.key, curated.question, curated.answer, curated.source.kind, curated.source.collection) == (
        f"correction:{correction.pk}", QUESTION, "You can return it for free within 30 days of delivery.",
        "curated", "default")
    chunk = curated.source.chunks.get()
    assert (chunk.text, chunk.start, chunk.end) == (curated.answer, 0, len(curated.answer))
    assert np.allclose(np.array(list(chunk.embedding), dtype=float), get_embedding_model()
                       .encode([QUESTION])[0], atol=1e-5)
    assert [(e.source_id, e.start, e.end) for e in curated.evidence.all()] == [
        (kb["returns"], kb["evidence"].start, kb["evidence"].end)]
    # and chunk_search retrieves it like any other source, first for a close question
    found = chunk_search("How long do I have to send an item back?", k=5, collection="default")
    assert found[0].chunk_id == chunk.pk
    # when a customer asks a close question in a new conversation
    events, message = ask("how long do I have to return an item")
    # then the curated answer is served at once, citing the agent's evidence passage, and the trace says so
    assert events["chat.token"] == {"text": SERVED}
    assert events["chat.done"]["method"] == "curated"
    assert events["chat.citations"]["citations"] == [{
        "n": 1, "chunk_id": kb["evidence"].pk, "source_id": kb["returns"], "source_title": "Returns",
        "start": kb["evidence"].start, "end": kb["evidence"].end, "method": "curated", "title": "Returns",
        "excerpt": kb["evidence"].text}]
    assert (message.text, message.abstained, message.model_version_id) == (SERVED, False, None)
    assert message.citations == [{"n": 1, "chunk_id": kb["evidence"].pk, "source_id": kb["returns"],
                                  "source_title": "Returns", "start": kb["evidence"].start,
                                  "end": kb["evidence"].end, "method": "curated"}]
    assert (message.grounding["method"], message.grounding["curated_id"], message.grounding["curated_question"]) == (
        "curated", curated.pk, QUESTION)
    assert 0 <= message.grounding["curated_distance"] <= 0.2
    # and the agents' desk shows which curated answer was served
    client = Client()
    client.force_login(agent)
    page = client.get(f"/dashboard/conversations/{message.conversation_id}/").content.decode()
    assert "Curated answer (an approved correction)" in page and f"#curated-{curated.pk}" in page
    # and the widget may open the cited passage (it was cited in this conversation)
    response = Client().get(f"/api/conversations/{message.conversation_id}/passages/{kb['evidence'].pk}/",
                            HTTP_X_CONVERSATION_TOKEN=message.conversation.token)
    assert response.status_code == 200 and response.json()["passage"] == kb["evidence"].text


def test_an_unrelated_question_matches_no_curated_answer(kb, agent, agent2):
    approved(kb, agent, agent2)
    for question in ["What is the capital of France?", "How do I bake sourdough bread?",
                     "Do tents carry a warranty?"]:
        assert curated_answer_match(question, collection="default") is None
    # nor does a question of another collection
    assert curated_answer_match(QUESTION, collection="other") is None


def test_the_active_embedding_versions_fitted_match_threshold_decides_which_questions_match(kb, agent, agent2, settings):
    from knowledge.models import EmbeddingModelVersion

    # Given an approved correction and a paraphrase of its question at distance d from it
    approved(kb, agent, agent2)
    paraphrase = "How many days can I take to send an item back?"
    question, other = get_embedding_model().encode([QUESTION, paraphrase])
    d = 1.0 - float(np.dot(question, other))
    assert 0.05 < d < 0.6
    # and the settings' threshold above d, so the paraphrase matches with no version registered
    settings.CURATED_MATCH_MAX_DISTANCE = d + 0.05
    assert curated_answer_match(paraphrase, collection="default") is not None

    # When the active embedding version (the settings' model) carries a fitted threshold below d
    version = EmbeddingModelVersion.objects.create(
        name=settings.EMBEDDING_MODEL_NAME, path=str(settings.EMBEDDING_MODEL), dimension=settings.EMBEDDING_DIM,
        status="active", curated_match_max_distance=d - 0.05)
    # Then the paraphrase no longer matches, the question itself still does
    assert curated_answer_match(paraphrase, collection="default") is None
    assert curated_answer_match(QUESTION, collection="default").question == QUESTION
    # and an explicit max_distance still overrides it
    assert curated_answer_match(paraphrase, collection="default", max_distance=d + 0.01) is not None
    # When the fitted threshold is cleared, then the setting decides again
    EmbeddingModelVersion.objects.filter(pk=version.pk).update(curated_match_max_distance=None)
    assert curated_answer_match(paraphrase, collection="default") is not None


def test_curated_question_vectors_are_the_stored_embeddings_of_the_live_curated_questions(kb, agent, agent2):
    from knowledge.selectors import curated_question_vectors

    # Given one approved correction: its curated chunk holds the embedding of its question
    correction = approved(kb, agent, agent2)
    (chunk_id, vector), = curated_question_vectors().items()
    assert chunk_id == Chunk.objects.get(source__kind="curated").pk
    assert np.allclose(vector, get_embedding_model().encode([QUESTION])[0], atol=1e-5)
    # When the correction is withdrawn (its curated answer leaves), then there is none
    services.correction_revoke(correction.pk, reviewer=agent2)
    assert curated_question_vectors() == {}


def test_only_a_conversations_first_question_is_answered_from_a_curated_answer(kb, agent, agent2, fake_engine):
    approved(kb, agent, agent2)
    # given a conversation in which the customer already asked something
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="user", text="Do tents carry a warranty?")
    Message.objects.create(conversation=conversation, role="assistant", text="Yes, two years.")
    fake_engine.script(["Returns are free within 30 days of delivery [1]."])
    # when the customer then asks the curated question word for word
    events = {e.type: e.data for e in answer_stream(conversation.pk, QUESTION)}
    # then it is answered the usual way (retrieval, quote or the model), not from the curated answer
    assert events["chat.done"]["method"] in ("generated", "extractive")
    message = Message.objects.get(pk=events["chat.done"]["message_id"])
    assert "curated_id" not in message.grounding


def test_a_correction_without_evidence_is_not_curated_and_the_dashboard_says_why(kb, agent, agent2):
    # when a correction without supporting chunks is approved
    correction = approved(kb, agent, agent2, evidence=False)
    # then nothing enters the knowledge base, and the reason is recorded and shown
    assert curated_state() == (0, 0, 0, 0)
    assert (correction.status, correction.curated_answer_id, correction.curation_note) == (
        "approved", None, services.NOT_CURATED_NO_EVIDENCE)
    client = Client()
    client.force_login(agent)
    page = client.get("/dashboard/corrections/?status=approved").content.decode()
    assert "no supporting chunks were picked" in page
    # and the question is answered the usual way
    assert curated_answer_match(QUESTION, collection="default") is None


def test_withdrawing_an_approved_correction_removes_its_curated_answer_in_the_same_transaction(kb, agent, agent2):
    correction = approved(kb, agent, agent2)
    # given the deletion fails inside the withdrawal: the correction stays approved and curated
    with mock.patch.object(knowledge_services, "curated_answer_delete", side_effect=RuntimeError("disk")):
        with pytest.raises(RuntimeError):
            services.correction_revoke(correction.pk, reviewer=agent2)
    correction.refresh_from_db()
    assert (correction.status, correction.curated_answer_id is not None) == ("approved", True)
    assert curated_state() == (1, 1, 1, 1)
    # the author cannot withdraw it; nothing changes
    with pytest.raises(services.CorrectionError):
        services.correction_revoke(correction.pk, reviewer=agent)
    assert curated_state() == (1, 1, 1, 1)
    # when a second agent withdraws it from the dashboard
    client = Client()
    client.force_login(agent2)
    response = client.post(f"/dashboard/corrections/{correction.pk}/withdraw/", {"note": "wrong window"})
    assert response.status_code == 302
    # then it is rejected and its curated answer, source, chunk and evidence are gone
    correction.refresh_from_db()
    assert (correction.status, correction.review_note, correction.curated_answer_id, correction.curation_note) == (
        "rejected", "wrong window", None, "not served as a curated answer: rejected")
    assert curated_state() == (0, 0, 0, 0)
    assert curated_answer_match(QUESTION, collection="default") is None


def test_a_changed_evidence_source_retires_the_answer_at_once_and_the_stale_flag_removes_it(kb, agent, agent2):
    correction = approved(kb, agent, agent2)
    curated_id = correction.curated_answer_id
    # when the evidence's source is re-ingested with other content
    kb["returns_file"].write_text(RETURNS_V2)
    assert knowledge_services.document_ingest(kb["returns"]).status == "ingested"
    # then, in the ingestion's transaction, the curated answer stops being served and retrieved
    curated = CuratedAnswer.objects.get(pk=curated_id)
    assert curated.retired_reason == f"evidence changed: source {kb['returns']} changed"
    assert Chunk.objects.filter(source__kind="curated").count() == 0
    assert curated_answer_match(QUESTION, collection="default") is None
    # given the deletion fails while the stale flag is written: the flag is rolled back with it
    with mock.patch.object(knowledge_services, "curated_answer_delete", side_effect=RuntimeError("disk")):
        with pytest.raises(RuntimeError):
            services.corrections_flag_stale()
    correction.refresh_from_db()
    assert (correction.stale, correction.curated_answer_id) == (False, curated_id)
    # when the stale check runs
    assert services.corrections_flag_stale() == 1
    # then the correction is stale and its curated answer left the knowledge base with the flag
    correction.refresh_from_db()
    assert (correction.stale, correction.curated_answer_id, correction.curation_note) == (
        True, None, f"not served as a curated answer: stale (source {kb['returns']} changed)")
    assert curated_state() == (0, 0, 0, 0)


def test_a_deleted_evidence_source_retires_the_answer(kb, agent, agent2):
    correction = approved(kb, agent, agent2)
    knowledge_services.source_delete(Source.objects.get(pk=kb["returns"]))
    curated = CuratedAnswer.objects.get(pk=correction.curated_answer_id)
    assert curated.retired_reason == f"evidence changed: source {kb['returns']} was deleted"
    assert curated_answer_match(QUESTION, collection="default") is None


def test_a_forced_re_ingest_of_the_same_content_keeps_the_answer_served(kb, agent, agent2):
    approved(kb, agent, agent2)
    assert knowledge_services.document_ingest(kb["returns"], force=True).status == "ingested"
    match = curated_answer_match(QUESTION, collection="default")
    assert match is not None
    new_chunk = Chunk.objects.filter(source_id=kb["returns"]).order_by("ordinal").first()
    assert [c.chunk_id for c in match.evidence] == [new_chunk.pk]


def test_editing_a_curated_answer_in_the_dashboard_re_embeds_it(kb, agent, agent2, embedding_model):
    correction = approved(kb, agent, agent2)
    curated = CuratedAnswer.objects.get(pk=correction.curated_answer_id)
    client = Client()
    client.force_login(agent)
    url = f"/dashboard/corrections/curated/{curated.pk}/"
    # the page lists it with its evidence
    page = client.get("/dashboard/corrections/curated/").content.decode()
    assert f'data-curated-id="{curated.pk}"' in page and QUESTION in page
    # bad input: an empty answer changes nothing and is no server error
    response = client.post(url, {"question": "Return window?", "answer": "  "}, follow=True)
    assert response.status_code == 200 and "write both the question and the answer" in response.content.decode()
    assert CuratedAnswer.objects.get(pk=curated.pk).question == QUESTION
    assert client.post("/dashboard/corrections/curated/999999/", {"question": "q", "answer": "a"}).status_code == 404
    # when an agent rewrites the question and the answer
    new_question = "What is the return window for online orders?"
    response = client.post(url, {"question": new_question, "answer": "Thirty days from delivery."})
    assert response.status_code == 302
    # then the entry, its source and its chunk hold the new text, embedded from the new question
    curated.refresh_from_db()
    chunk = curated.source.chunks.get()
    assert (curated.question, curated.answer, curated.edited_by_id, curated.source.title, chunk.text) == (
        new_question, "Thirty days from delivery.", agent.pk, new_question, "Thirty days from delivery.")
    assert np.allclose(np.array(list(chunk.embedding), dtype=float), embedding_model.encode([new_question])[0], atol=1e-5)
    # and a question close to the new wording is served the new answer
    events, message = ask("what's the return window for online orders")
    assert (events["chat.token"]["text"], message.grounding["curated_id"]) == ("Thirty days from delivery. [1]", curated.pk)


def test_re_embedding_the_knowledge_base_embeds_a_curated_answer_from_its_question(kb, agent, agent2, embedding_model):
    correction = approved(kb, agent, agent2)
    chunk = Chunk.objects.get(source__kind="curated")
    Chunk.objects.filter(pk=chunk.pk).update(embedding=[0.0] * 383 + [1.0])
    # when every chunk is re-embedded (manage.py reembed --all)
    knowledge_services.reembed(everything=True)
    # then the curated chunk holds its question's vector again (not its answer's passage text)
    chunk.refresh_from_db()
    assert np.allclose(np.array(list(chunk.embedding), dtype=float), embedding_model.encode([QUESTION])[0], atol=1e-5)
    assert curated_answer_match(QUESTION, collection="default").curated_id == correction.curated_answer_id


def test_the_tuning_evaluation_path_leaves_curated_answers_out_of_retrieval_too(kb, agent, agent2, fake_engine):
    # given an approved correction: its curated chunk is the closest passage to its own question
    approved(kb, agent, agent2)
    curated_chunk = Chunk.objects.get(source__kind="curated")
    assert chunk_search(QUESTION, k=5, collection="default")[0].chunk_id == curated_chunk.pk
    # when retrieval leaves curated sources out (what answer_compose(curated=False) asks for)
    found = chunk_search(QUESTION, k=5, collection="default", exclude_kinds=("curated",))
    # then the evidence passage comes first and the held-out answer is not among the sources
    assert [c.chunk_id for c in found][0] == kb["evidence"].pk
    assert curated_chunk.pk not in [c.chunk_id for c in found]
    # and the pipeline run the way the evaluation runs it retrieves no curated chunk either
    from chat.services import answer_compose

    events = list(answer_compose(QUESTION, collection="default", curated=False, quote_first=False))
    composed = events[-1].data["answer"]
    assert composed.method != "curated"
    assert curated_chunk.pk not in [row["chunk_id"] for row in composed.trace]
