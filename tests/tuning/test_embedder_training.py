"""Embedder fine-tuning on corrections (``tuning.embedder_training``): examples from a correction's
picked and shown chunks, batches without false in-batch negatives, and a real MiniLM training run
that moves a question towards the chunk the agent picked."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from django.conf import settings

from tuning.embedder_training import (
    EmbedderExample,
    EmbedderHyperparameters,
    batches_without_duplicates,
    correction_examples,
    embedder_train,
    examples_sha256,
)
from tuning.training import TrainingStopped


def chunk(chunk_id, source_id, start, end, text, title="Renewals", heading_path=("Licences",)):
    return {"chunk_id": chunk_id, "source_id": source_id, "source_title": title, "heading_path": list(heading_path),
            "start": start, "end": end, "text": text, "content_hash": "h"}


def correction(pk, question, supporting, shown, history=()):
    return SimpleNamespace(pk=pk, question=question, history=list(history), supporting_chunks=supporting,
                           shown_chunks=shown)


def test_correction_examples_pair_the_retrieval_query_with_each_picked_chunk_and_the_best_unpicked_shown_chunk():
    # Given a follow-up question whose agent picked chunks 2 and 3, and retrieval showed 9, 2, 4 and 7,
    # where 4 overlaps picked chunk 3 (same source, overlapping range)
    picked = [chunk(2, 1, 0, 100, "Renew online."), chunk(3, 1, 100, 200, "Bring your old licence.")]
    shown = [chunk(9, 5, 0, 50, "Vehicle registration fees."), picked[0], chunk(4, 1, 150, 250, "Overlap."),
             chunk(7, 6, 0, 80, "Boat permits.")]
    item = correction(11, "How do I renew it?", picked, shown,
                      history=[{"role": "user", "text": "My driver licence expires."},
                               {"role": "agent", "text": "Sorry to hear."}])

    # When its examples are built
    examples = correction_examples(item, "seed:d1")

    # Then there is one per picked chunk, the anchor is the question then the earlier user question,
    # the positive is the embedded text (title > headings, then passage) and the hard negative is the
    # best-ranked shown chunk that is neither picked nor overlapping a picked one
    assert examples == [
        EmbedderExample(anchor="How do I renew it?\nMy driver licence expires.",
                        positive="Renewals > Licences\nRenew online.",
                        negative="Renewals > Licences\nVehicle registration fees.",
                        positive_chunk_id=2, negative_chunk_id=9, correction_id=11, group="seed:d1",
                        positive_source_id=1),
        EmbedderExample(anchor="How do I renew it?\nMy driver licence expires.",
                        positive="Renewals > Licences\nBring your old licence.",
                        negative="Renewals > Licences\nVehicle registration fees.",
                        positive_chunk_id=3, negative_chunk_id=9, correction_id=11, group="seed:d1",
                        positive_source_id=1),
    ]


def test_a_correction_without_picked_chunks_gives_no_example_and_one_without_other_shown_chunks_no_negative():
    # Given an abstention correction (no picked chunk) and one whose only shown chunk is the picked one
    picked = [chunk(2, 1, 0, 100, "Renew online.")]

    # Then the first gives nothing and the second an example without a hard negative
    assert correction_examples(correction(1, "Weather?", [], [chunk(9, 5, 0, 5, "x")]), "g") == []
    [example] = correction_examples(correction(2, "Renew?", picked, picked), "g")
    assert (example.negative, example.negative_chunk_id) == ("", None)


def test_curated_answers_are_never_a_positive_or_a_hard_negative():
    # Given a question whose retrieval showed a curated answer first (an earlier approved correction,
    # recorded as such in its snapshot), then a passage, and whose agent picked the curated answer and a passage
    curated = {**chunk(8, 40, 0, 60, "Q: How do I renew it? A: Online."), "source_kind": "curated"}
    passage = chunk(2, 1, 0, 100, "Renew online.")
    other = chunk(9, 5, 0, 50, "Vehicle registration fees.")
    item = correction(12, "How do I renew it?", [curated, passage], [curated, other, passage])

    # When its examples are built
    examples = correction_examples(item, "g")

    # Then the passage is the only positive and the next passage shown, not the curated answer, is its negative
    assert [(e.positive_chunk_id, e.negative_chunk_id) for e in examples] == [(2, 9)]

    # and a snapshot taken before the kind was recorded is recognised by its curated source id
    legacy = chunk(8, 40, 0, 60, "Q: How do I renew it? A: Online.")
    old = correction(13, "How do I renew it?", [passage], [legacy, other, passage])
    assert [e.negative_chunk_id for e in correction_examples(old, "g", curated_source_ids={40})] == [9]
    assert [e.negative_chunk_id for e in correction_examples(old, "g")] == [8]

    # and a correction whose only evidence is a curated answer teaches nothing
    assert correction_examples(correction(14, "How do I renew it?", [curated], [curated, other]), "g") == []


def example(anchor, positive_id, negative_id=None):
    return EmbedderExample(anchor=anchor, positive=f"p{positive_id}", negative=f"p{negative_id}" if negative_id else "",
                           positive_chunk_id=positive_id, negative_chunk_id=negative_id, correction_id=0, group="g")


def test_batches_never_hold_a_positive_or_an_anchor_twice_nor_a_positive_as_a_negative():
    # Given examples sharing a positive (1), a positive that is another's negative (2 / 5 -> 2), an anchor (q3)
    # and a hard negative (9, which is harmless)
    examples = [example("q1", 1, 5), example("q2", 1, 6), example("q3", 2, 7), example("q4", 5, 2),
                example("q3", 3, 8), example("q5", 4, 9), example("q6", 10, 9)]

    # When they are cut into batches of 3
    batches = batches_without_duplicates(examples, 3, random.Random(0))

    # Then every example is used exactly once, no batch exceeds 3, and no chunk or anchor repeats in a batch
    assert sorted(map(repr, (e for b in batches for e in b))) == sorted(map(repr, examples))
    for batch in batches:
        assert len(batch) <= 3
        positives = [e.positive_chunk_id for e in batch]
        assert len(positives) == len(set(positives))
        assert not set(positives) & {e.negative_chunk_id for e in batch}
        assert len({e.anchor for e in batch}) == len(batch)
    # and with room for everything, the two examples sharing only a negative can share a batch
    [together] = [b for b in batches_without_duplicates(examples[5:], 3, random.Random(0))]
    assert len(together) == 2


def test_examples_with_and_without_a_hard_negative_never_share_a_batch():
    # Given four examples with a hard negative and four without (their retrieval showed only curated
    # answers or the picked chunk), all distinct
    examples = [example(f"q{i}", i, 100 + i) for i in range(4)] + [example(f"r{i}", 10 + i) for i in range(4)]

    # When they are cut into batches of 8
    batches = batches_without_duplicates(examples, 8, random.Random(0))

    # Then each batch is all with or all without, so the four hard negatives are all trained on
    assert sorted(len(b) for b in batches) == [4, 4]
    assert all(len({bool(e.negative) for e in b}) == 1 for b in batches)


def test_examples_sha256_changes_with_content_and_order():
    a, b = example("q1", 1, 2), example("q2", 3, 4)
    assert examples_sha256([a, b]) == examples_sha256([a, b])
    assert examples_sha256([a, b]) != examples_sha256([b, a])


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=1), dict(learning_rate=0.0),
                                 dict(mini_batch_size=-1)])
def test_invalid_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        EmbedderHyperparameters(**bad)


TOPICS = [
    ("How long does my passport renewal take?", "Passports\nProcessing takes six to eight weeks after we receive the form.",
     "Passports\nA passport photo must be two by two inches."),
    ("Can I pay the parking fine by card?", "Fines\nParking penalties may be settled with a credit or debit card online.",
     "Fines\nSpeeding tickets add points to your driving record."),
    ("Who qualifies for survivor benefits?", "Survivors\nA widow or widower aged 60 or older may receive payments.",
     "Survivors\nReport a death by calling the office."),
    ("Where do I send form DS-82?", "Mailing\nPost the application to the address printed on the instructions.",
     "Mailing\nForms can be downloaded as PDF files."),
]


def training_examples():
    examples = []
    for i, (question, passage, negative) in enumerate(TOPICS):
        examples.append(EmbedderExample(anchor=question, positive=passage, negative=negative, positive_chunk_id=i + 1,
                                        negative_chunk_id=i + 11, correction_id=i, group=f"g{i}"))
    return examples


@pytest.mark.parametrize("mini_batch_size", [0, 1], ids=["mnrl", "cached-mnrl"])
def test_embedder_train_moves_questions_towards_their_picked_chunks_and_saves_a_loadable_model(tmp_path, monkeypatch,
                                                                                               mini_batch_size):
    # Given the real MiniLM embedder and four (question -> picked chunk, hard negative) examples, trained
    # with MultipleNegativesRankingLoss or its cached variant embedding one text at a time
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    cached_calls = []
    cached_forward = losses.CachedMultipleNegativesRankingLoss.forward
    monkeypatch.setattr(losses.CachedMultipleNegativesRankingLoss, "forward",
                        lambda self, *a, **k: cached_calls.append(self.mini_batch_size) or cached_forward(self, *a, **k))

    examples = training_examples()
    base = SentenceTransformer(settings.EMBEDDING_MODEL, device="cpu")

    def margin(model):
        q = model.encode([e.anchor for e in examples], normalize_embeddings=True)
        p = model.encode([e.positive for e in examples], normalize_embeddings=True)
        n = model.encode([e.negative for e in examples], normalize_embeddings=True)
        return float(np.mean((q * p).sum(1) - (q * n).sum(1)))

    before = margin(base)
    steps = []

    # When it is fine-tuned for 6 epochs in batches of 2 at a high learning rate
    result = embedder_train(
        settings.EMBEDDING_MODEL, examples, tmp_path / "model",
        EmbedderHyperparameters(epochs=6, batch_size=2, learning_rate=2e-4, warmup_ratio=0.0, seed=0,
                                mini_batch_size=mini_batch_size),
        on_step=lambda point, total: steps.append((point["step"], total)),
    )

    # Then each step was reported, the loss curve has one point per step, the saved model loads with the
    # same dimension, and questions are closer to their picked chunk than to the negative than before
    assert result.steps == 12 and [s for s, _ in steps] == list(range(1, 13)) and {t for _, t in steps} == {12}
    assert [p["step"] for p in result.loss_curve] == list(range(1, 13))
    assert result.loss_curve[-1]["epoch"] == 6.0
    assert result.dimension == settings.EMBEDDING_DIM == 384
    tuned = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert margin(tuned) > before
    # and the cached loss ran every step, one text at a time, only when asked for
    assert cached_calls == ([1] * 12 if mini_batch_size else [])


def test_embedder_train_stops_when_asked_and_saves_nothing(tmp_path):
    # Given a stop request after the first step
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1

    # When training runs, then it raises TrainingStopped after one step and writes no model
    with pytest.raises(TrainingStopped) as stopped:
        embedder_train(settings.EMBEDDING_MODEL, training_examples(), tmp_path / "model",
                       EmbedderHyperparameters(batch_size=2), should_stop=should_stop)
    assert (stopped.value.steps_done, stopped.value.total_steps) == (1, 2)
    assert not (tmp_path / "model").exists()


def test_embedder_train_refuses_fewer_than_two_examples(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        embedder_train(settings.EMBEDDING_MODEL, training_examples()[:1], tmp_path / "model")
