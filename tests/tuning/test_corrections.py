"""Corrections: the snapshot they keep, review by a second agent, the JSONL export, and the stale
flag when a source changes afterwards."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.test import Client

from django.conf import settings

from chat.prompts import INSTRUCTION, grounded_messages
from knowledge.models import Source
from tuning import services
from tuning.models import Correction
from tuning.services import _as_retrieved

pytestmark = pytest.mark.django_db


def answer_of(conversation):
    return conversation.messages.filter(role="assistant").order_by("-id").first()


def snapshot(chunk, title):
    return {"chunk_id": chunk.pk, "source_id": chunk.source_id, "source_kind": "file", "source_title": title,
            "heading_path": [],
            "start": chunk.start, "end": chunk.end, "text": chunk.text, "content_hash": "hash-v1"}


def test_correction_keeps_answer_question_history_and_exact_chunks(conversation, knowledge, agent):
    # given the answer "Refunds take ten days [1]." shown chunks refunds, free returns, countries
    answer = answer_of(conversation)
    # when alice corrects it, supported by the refunds chunk and the express chunk found by search
    correction = services.correction_create(
        answer.pk, author=agent, corrected_answer="Refunds take five business days [1].", reason="wrong_fact",
        supporting_chunk_ids=[knowledge["refunds"].pk, knowledge["express"].pk],
    )
    # then the snapshot is exact
    correction.refresh_from_db()
    assert correction.original_answer == "Refunds take ten days [1]."
    assert correction.question == "How long do refunds take?"
    assert correction.history == [{"role": "user", "text": "Hi there"}, {"role": "assistant", "text": "Hello! How can I help?"}]
    assert correction.shown_chunks == [snapshot(knowledge["refunds"], "Returns"), snapshot(knowledge["free_returns"], "Returns"),
                                       snapshot(knowledge["countries"], "Shipping")]
    assert correction.supporting_chunks == [snapshot(knowledge["refunds"], "Returns"), snapshot(knowledge["express"], "Shipping")]
    assert knowledge["refunds"].text == "Refunds take five business days."
    assert (correction.status, correction.stale, correction.reviewer_id) == ("pending", False, None)


def test_invalid_corrections_store_nothing(conversation, agent):
    answer = answer_of(conversation)
    question = conversation.messages.filter(role="user").first()
    for kwargs in [
        {"message_id": answer.pk, "corrected_answer": "  ", "reason": "tone"},
        {"message_id": answer.pk, "corrected_answer": "x", "reason": "nonsense"},
        {"message_id": question.pk, "corrected_answer": "x", "reason": "tone"},
        {"message_id": answer.pk, "corrected_answer": "x", "reason": "tone", "supporting_chunk_ids": [999999]},
    ]:
        message_id = kwargs.pop("message_id")
        with pytest.raises(services.CorrectionError):
            services.correction_create(message_id, author=agent, **kwargs)
    assert Correction.objects.count() == 0


def test_review_by_a_second_agent_only(conversation, agent, agent2):
    correction = services.correction_create(answer_of(conversation).pk, author=agent, corrected_answer="Five days [1].", reason="wrong_fact")
    # the author cannot review their own correction (service and database)
    with pytest.raises(services.CorrectionError, match="other than its author"):
        services.correction_review(correction.pk, reviewer=agent, approve=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        Correction.objects.filter(pk=correction.pk).update(status="approved", reviewer=agent)
    assert Correction.objects.get(pk=correction.pk).status == "pending"
    # a second agent approves it; it cannot be decided twice
    approved = services.correction_review(correction.pk, reviewer=agent2, approve=True, note="checked")
    assert (approved.status, approved.reviewer_id, approved.review_note) == ("approved", agent2.pk, "checked")
    with pytest.raises(services.CorrectionError, match="already reviewed"):
        services.correction_review(correction.pk, reviewer=agent2, approve=False)


def test_dashboard_correction_flow_over_http(conversation, knowledge, agent, agent2):
    # given alice writes a correction through the form
    alice, bob = Client(), Client()
    alice.force_login(agent)
    bob.force_login(agent2)
    answer = answer_of(conversation)
    form = alice.get(f"/dashboard/corrections/answers/{answer.pk}/").content.decode()
    assert "Refunds take five business days." in form and "shown to model" in form
    response = alice.post(f"/dashboard/corrections/answers/{answer.pk}/", {
        "corrected_answer": "Refunds take five business days [1].", "reason": "wrong_fact", "chunk": [str(knowledge["refunds"].pk)],
    })
    assert response.status_code == 302
    correction = Correction.objects.get()
    # when alice tries to approve it herself, then it stays pending
    alice.post(f"/dashboard/corrections/{correction.pk}/review/", {"decision": "approve"})
    assert Correction.objects.get().status == "pending"
    # when bob approves it, then it is approved by bob
    bob.post(f"/dashboard/corrections/{correction.pk}/review/", {"decision": "approve"})
    assert Correction.objects.values_list("status", "reviewer__username").get() == ("approved", "bob")


def test_export_writes_approved_corrections_as_chat_records(conversation, knowledge, agent, agent2, tmp_path):
    # given one approved, one pending and one rejected correction
    answer = answer_of(conversation)
    approved = services.correction_create(answer.pk, author=agent, corrected_answer="Refunds take five business days [1]. Express costs 15 dollars [4].",
                                          reason="wrong_fact", supporting_chunk_ids=[knowledge["refunds"].pk, knowledge["express"].pk])
    services.correction_review(approved.pk, reviewer=agent2, approve=True)
    services.correction_create(answer.pk, author=agent, corrected_answer="pending one", reason="tone")
    rejected = services.correction_create(answer.pk, author=agent, corrected_answer="rejected one", reason="tone")
    services.correction_review(rejected.pk, reviewer=agent2, approve=False)
    # when exported
    output = tmp_path / "train.jsonl"
    call_command("export_training_data", output=str(output))
    # then exactly the approved one, as the served model sees it: the serving prompt with at most
    # LLM_PROMPT_SOURCES sources (both gold chunks and the first chunk retrieval showed besides them),
    # no history turns before it, and the corrected answer cited to where its chunks now sit
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    record = records[0]
    texts = {knowledge["refunds"].pk: "Returns: Refunds take five business days.",
             knowledge["free_returns"].pk: "Returns: Returns are free within 30 days.",
             knowledge["express"].pk: "Shipping: Express shipping costs 15 dollars."}
    chunk_ids = record["metadata"]["chunk_ids"]
    assert sorted(chunk_ids) == sorted(texts) and settings.LLM_PROMPT_SOURCES == 3
    prompt = ("Sources:\n" + "\n\n".join(f"[{n}] {texts[c]}" for n, c in enumerate(chunk_ids, start=1))
              + "\n\nQuestion: How long do refunds take?\n" + INSTRUCTION)
    refunds, express = chunk_ids.index(knowledge["refunds"].pk) + 1, chunk_ids.index(knowledge["express"].pk) + 1
    assert record["messages"] == [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": f"Refunds take five business days [{refunds}]. Express costs 15 dollars [{express}]."},
    ]
    # the same builder as serving: chat.prompts.grounded_messages with the serving excerpt length
    sources = [_as_retrieved(next(s for s in approved.supporting_chunks + approved.shown_chunks if s["chunk_id"] == c))
               for c in chunk_ids]
    assert record["messages"][:-1] == grounded_messages("How long do refunds take?", sources,
                                                        max_chars=settings.LLM_SOURCE_MAX_CHARS)
    metadata = record["metadata"]
    assert (metadata["correction_id"], metadata["message_id"], metadata["reason"]) == (approved.pk, answer.pk, "wrong_fact")
    assert metadata["history"] == [{"role": "user", "text": "Hi there"}, {"role": "assistant", "text": "Hello! How can I help?"}]
    assert sorted(metadata["gold_chunk_ids"]) == sorted([knowledge["refunds"].pk, knowledge["express"].pk])


def test_a_changed_source_flags_the_correction_stale_and_keeps_it_out_of_the_export(conversation, knowledge, agent, agent2, tmp_path):
    # given an approved correction citing the Returns and Shipping sources
    correction = services.correction_create(answer_of(conversation).pk, author=agent, corrected_answer="Five days [1].",
                                            reason="wrong_fact", supporting_chunk_ids=[knowledge["refunds"].pk])
    services.correction_review(correction.pk, reviewer=agent2, approve=True)
    assert services.corrections_flag_stale() == 0
    # when the Shipping source is re-ingested with different content
    Source.objects.filter(pk=knowledge["shipping"].pk).update(content_hash="hash-v2")
    # then the check flags it (once), and the export leaves it out
    assert services.corrections_flag_stale(source_ids=[knowledge["returns"].pk + knowledge["shipping"].pk + 1000]) == 0
    assert services.corrections_flag_stale() == 1
    assert services.corrections_flag_stale() == 0
    correction.refresh_from_db()
    assert (correction.stale, correction.stale_reason, correction.status) == (True, f"source {knowledge['shipping'].pk} changed", "approved")
    output = tmp_path / "train.jsonl"
    call_command("export_training_data", output=str(output))
    assert output.read_text(encoding="utf-8") == ""


def test_export_runs_the_stale_check_itself(conversation, knowledge, agent, agent2, tmp_path):
    correction = services.correction_create(answer_of(conversation).pk, author=agent, corrected_answer="Five days [1].", reason="wrong_fact")
    services.correction_review(correction.pk, reviewer=agent2, approve=True)
    knowledge["returns"].delete()
    output = tmp_path / "train.jsonl"
    call_command("export_training_data", output=str(output))
    assert output.read_text(encoding="utf-8") == ""
    assert Correction.objects.get().stale is True
