"""Dataset snapshots with the RAFT recipe: exact records, citation renumbering, the gold share, a
held-out split that never moves, stale corrections left out, and versioned immutable snapshots."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from chat.models import Conversation, Message
from chat.prompts import INSTRUCTION
from chat.services import ABSTAIN_MESSAGE
from knowledge.models import Source
from tests.dashboard.conftest import make_source
from tuning import services
from tuning.datasets import (
    DatasetError, RaftRecipe, _renumber, place_markers, correction_split, dataset_records, dataset_snapshot_create, raft_example,
)
from tuning.models import Correction, TrainingDataset, TrainingExample

pytestmark = pytest.mark.django_db


def approved(conversation, knowledge, agent, agent2, *, answer="Refunds take five business days [1].", support=("refunds",)):
    answer_message = conversation.messages.filter(role="assistant").order_by("-id").first()
    correction = services.correction_create(answer_message.pk, author=agent, corrected_answer=answer,
                                            reason="wrong_fact", supporting_chunk_ids=[knowledge[k].pk for k in support])
    return services.correction_review(correction.pk, reviewer=agent2, approve=True)


def another_conversation(knowledge, question):
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="user", text=question)
    Message.objects.create(conversation=conversation, role="assistant", text="Express is free [1].", retrieval=[
        {"chunk_id": knowledge[k].pk, "source_id": knowledge[k].source_id, "score": 0.03, "vector_distance": 0.3, "text_rank": None}
        for k in ("countries", "express", "refunds")])
    return conversation


def test_renumber_maps_markers_to_the_new_order_and_places_gold_when_none_left():
    # old sources: [1]=10, [2]=20, [3]=30; new prompt order: 30, 10
    gold = [{"chunk_id": 10, "text": "Refunds reach your card within five business days."}]
    assert _renumber("A [1] and B [3].", [10, 20, 30], [30, 10], gold) == "A [2] and B [1]."
    assert _renumber("Only [2], [1, 3].", [10, 20, 30], [30, 10], gold) == "Only, [2][1]."
    assert _renumber("No marker here.", [10, 20, 30], [30, 10], gold) == "No marker here [2]."
    assert _renumber("Gone [2]", [10, 20, 30], [30, 10], gold) == "Gone [2]"


def test_place_markers_cites_each_gold_after_the_sentence_its_text_supports():
    gold = [(1, "Express shipping is free on orders over 50 dollars."),
            (3, "Refunds reach your card within five business days.")]
    text = "Thanks for asking. Refunds reach your card within five business days. Express shipping is free over 50 dollars."
    assert place_markers(text, gold) == ("Thanks for asking. Refunds reach your card within five business days [3]. "
                                         "Express shipping is free over 50 dollars [1].")
    # no sentence mostly made of a gold's words: the one sharing most words carries every gold number
    assert place_markers("Hello there. Your card gets the money back soon.", gold) == (
        "Hello there. Your card gets the money back soon [1][3].")
    assert place_markers("Nothing to cite.", []) == "Nothing to cite."


def test_oracle_example_is_the_serving_prompt_with_gold_and_real_distractors(conversation, knowledge, agent, agent2):
    # given an approved correction supported by the refunds chunk; the model was shown refunds, free returns, countries
    correction = approved(conversation, knowledge, agent, agent2)
    # when it is built with gold kept (gold_share 1)
    example = raft_example(correction, RaftRecipe(gold_share=1.0, seed=0))
    record = example["record"]
    ids = record["metadata"]["chunk_ids"]
    # then the prompt holds the gold and the two distractors retrieval returned, in a seeded order
    assert sorted(ids) == sorted([knowledge["refunds"].pk, knowledge["free_returns"].pk, knowledge["countries"].pk])
    gold_n = ids.index(knowledge["refunds"].pk) + 1
    assert example["has_gold"] is True and example["gold_numbers"] == [gold_n]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]  # no history: as served
    prompt = record["messages"][0]["content"]
    assert prompt.startswith("Sources:\n[1] ") and prompt.endswith(f"Question: How long do refunds take?\n{INSTRUCTION}")
    assert f"[{gold_n}] Returns: Refunds take five business days." in prompt
    # and the answer cites the gold at its new number
    assert record["messages"][1] == {"role": "assistant", "content": f"Refunds take five business days [{gold_n}]."}
    assert record["metadata"]["history"] == [{"role": "user", "text": "Hi there"},
                                             {"role": "assistant", "text": "Hello! How can I help?"}]


def test_example_without_gold_teaches_abstention(conversation, knowledge, agent, agent2):
    correction = approved(conversation, knowledge, agent, agent2)
    example = raft_example(correction, RaftRecipe(gold_share=0.0))
    ids = example["record"]["metadata"]["chunk_ids"]
    assert knowledge["refunds"].pk not in ids
    assert sorted(ids) == sorted([knowledge["free_returns"].pk, knowledge["countries"].pk])
    assert (example["has_gold"], example["gold_numbers"]) == (False, [])
    assert example["record"]["messages"][-1]["content"] == ABSTAIN_MESSAGE
    # held-out examples always keep their gold (they are reference answers)
    assert raft_example(correction, RaftRecipe(gold_share=0.0), heldout=True)["has_gold"] is True


def test_gold_share_is_drawn_per_correction_and_reproducible(knowledge, agent, agent2):
    corrections = []
    for i in range(40):
        conversation = another_conversation(knowledge, f"Is express shipping free? ({i})")
        answer = conversation.messages.get(role="assistant")
        c = services.correction_create(answer.pk, author=agent, corrected_answer="Express costs 15 dollars [2].",
                                       reason="wrong_fact", supporting_chunk_ids=[knowledge["express"].pk])
        corrections.append(services.correction_review(c.pk, reviewer=agent2, approve=True))
    recipe = RaftRecipe(gold_share=0.8, seed=3)
    draws = [raft_example(c, recipe)["has_gold"] for c in corrections]
    assert draws == [raft_example(c, recipe)["has_gold"] for c in corrections]  # same seed, same draws
    assert 24 <= sum(draws) <= 38  # 0.8 of 40 = 32, binomial sd 2.5
    assert any(not d for d in draws)


def test_holdout_split_is_a_fixed_function_of_the_conversation(knowledge, agent, agent2):
    corrections = []
    for i in range(30):
        conversation = another_conversation(knowledge, f"question {i}")
        c = services.correction_create(conversation.messages.get(role="assistant").pk, author=agent,
                                       corrected_answer="Fifteen dollars [2].", reason="wrong_fact",
                                       supporting_chunk_ids=[knowledge["express"].pk])
        corrections.append(services.correction_review(c.pk, reviewer=agent2, approve=True))
    first = dataset_snapshot_create(RaftRecipe(holdout_share=0.3))
    second = dataset_snapshot_create(RaftRecipe(holdout_share=0.3, seed=9))
    split = lambda d: dict(d.examples.values_list("correction_id", "split"))  # noqa: E731
    assert split(first) == split(second) == {c.pk: correction_split(c, 0.3) for c in corrections}
    assert 3 <= first.heldout_count <= 18 and first.train_count + first.heldout_count == 30
    assert (first.version, second.version) == (1, 2)
    assert len(dataset_records(first)) == first.train_count
    assert len(dataset_records(first, "heldout")) == first.heldout_count


def test_snapshot_excludes_stale_pending_and_rejected_corrections(conversation, knowledge, agent, agent2):
    good = approved(conversation, knowledge, agent, agent2)
    other = another_conversation(knowledge, "Do you ship to Mexico?")
    pending = services.correction_create(other.messages.get(role="assistant").pk, author=agent,
                                         corrected_answer="No [1].", reason="wrong_fact")
    warranty = make_source("Warranty", "Two years on all tents.")
    chunk = warranty.chunks.get()
    stale_conversation = Conversation.objects.create()
    Message.objects.create(conversation=stale_conversation, role="user", text="Warranty?")
    answer = Message.objects.create(conversation=stale_conversation, role="assistant", text="One year [1].", retrieval=[
        {"chunk_id": chunk.pk, "source_id": warranty.pk, "score": 0.03, "vector_distance": 0.2, "text_rank": None}])
    stale = services.correction_create(answer.pk, author=agent, corrected_answer="Two years [1].", reason="wrong_fact",
                                       supporting_chunk_ids=[chunk.pk])
    services.correction_review(stale.pk, reviewer=agent2, approve=True)
    # the warranty page changes after the correction was approved
    Source.objects.filter(pk=warranty.pk).update(content_hash="hash-v2")
    dataset = dataset_snapshot_create(RaftRecipe(holdout_share=0.0))
    assert list(dataset.examples.values_list("correction_id", flat=True)) == [good.pk]
    assert Correction.objects.get(pk=stale.pk).stale is True
    assert Correction.objects.get(pk=pending.pk).status == "pending"
    assert dataset.recipe["method"] == "raft" and dataset.recipe["holdout_share"] == 0.0
    assert len(dataset.sha256) == 64


def test_no_approved_corrections_is_a_clear_error_and_stores_nothing(conversation):
    with pytest.raises(DatasetError, match="no approved corrections"):
        dataset_snapshot_create()
    assert TrainingDataset.objects.count() == 0 and TrainingExample.objects.count() == 0


def test_dataset_versions_are_unique(conversation, knowledge, agent, agent2):
    approved(conversation, knowledge, agent, agent2)
    dataset = dataset_snapshot_create(RaftRecipe(holdout_share=0.0))
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainingDataset.objects.create(version=dataset.version, sha256="x")


def test_heldout_questions_keep_a_share_of_unanswerable_ones_stored_after_the_rest(knowledge, agent, agent2):
    from tuning.evaluation import heldout_questions

    # given 40 answerable corrections, then 12 the agents marked missing from the knowledge base
    for i in range(52):
        conversation = another_conversation(knowledge, f"question {i}")
        answerable = i < 40
        c = services.correction_create(
            conversation.messages.get(role="assistant").pk, author=agent,
            corrected_answer="Fifteen dollars [2]." if answerable else "Sorry, I could not find that.",
            reason="wrong_fact" if answerable else "missing_from_kb",
            supporting_chunk_ids=[knowledge["express"].pk] if answerable else [])
        services.correction_review(c.pk, reviewer=agent2, approve=True)
    dataset = dataset_snapshot_create(RaftRecipe(holdout_share=0.6))
    heldout = list(dataset.examples.filter(split="heldout").order_by("id"))
    missing = [e for e in heldout if not e.correction.supporting_chunks]
    assert len(missing) >= 2 and len(heldout) - len(missing) >= 6
    # when 8 questions are evaluated
    questions = heldout_questions(dataset, limit=8)
    # then a quarter are unanswerable (the first ones stored) and the rest answerable, in stored order
    assert len(questions) == 8
    assert [q.example_id for q in questions if not q.answerable] == [e.pk for e in missing[:2]]
    assert sum(q.answerable for q in questions) == 6
    assert [q.example_id for q in questions] == sorted(q.example_id for q in questions)
