"""The answerability verifier experiment's pure helpers (``benchmarks/answerability_verifier.py``):
locating sentences, labelling them against a gold span, building training pairs, choosing the
threshold. A small page written here; no model, no database."""

from __future__ import annotations

import random

from benchmarks.answerability_verifier import (
    choose_threshold,
    decisions_curve,
    locate_sentences,
    question_pairs,
    span_label,
)
from chat.grounding import source_sentences

PAGE = (
    "Mopeds\n\n"
    "Bring the certificate of origin. Mopeds are Class A, B or C by top speed.\n"
    "You must pay the registration fee and sales tax. The plate must be displayed on the rear."
)
# "You must pay the registration fee and sales tax."
FEE_START = PAGE.index("You must")
FEE_END = PAGE.index("tax.") + len("tax.")


def test_given_source_sentences_when_located_then_each_span_holds_its_sentence():
    sentences = source_sentences(PAGE)

    spans = locate_sentences(PAGE, sentences, base=100)

    assert sentences[0] == "Mopeds Bring the certificate of origin."  # the heading joins its sentence
    assert spans[0] == (100, 100 + PAGE.index("origin.") + len("origin."))
    assert [PAGE[s - 100:e - 100] for s, e in spans[1:]] == sentences[1:]


def test_given_a_sentence_missing_from_the_text_when_located_then_it_gets_minus_one_and_the_rest_are_found():
    spans = locate_sentences("One two three. Four five six.", ["Not here at all.", "Four five six."])

    assert spans == [(-1, -1), (15, 29)]


def test_given_a_gold_span_when_labelling_then_inside_is_1_apart_is_0_and_a_touch_is_left_out():
    assert span_label(10, 50, 10, 50) == 1
    assert span_label(10, 50, 20, 30) == 1  # a short span inside the sentence
    assert span_label(10, 50, 0, 200) == 1  # a sentence inside a long span
    assert span_label(60, 90, 10, 50) == 0
    assert span_label(10, 50, 45, 200) is None  # 5 characters of a 40-character sentence
    assert span_label(-1, -1, 10, 50) == 0


def _sentences(file: str, text: str) -> list[dict]:
    cut = source_sentences(text)
    return [{"file": file, "start": s, "end": e, "text": t} for t, (s, e) in zip(cut, locate_sentences(text, cut))]


def test_given_a_question_when_building_pairs_then_the_span_sentence_is_positive_and_its_neighbours_negative():
    page = _sentences("dmv/moped.txt", PAGE)
    other = [{"file": "dmv/boat.txt", "start": 0, "end": 30, "text": "Boats are registered at a DMV office."}]

    pairs = question_pairs("How much is the moped fee?", other + page, page, gold_file="dmv/moped.txt",
                           answer_start=FEE_START, answer_end=FEE_END, max_retrieved=10, max_page=1,
                           rng=random.Random(0))

    assert pairs[0] == ("How much is the moped fee?", "You must pay the registration fee and sales tax.", 1)
    assert sum(label for *_, label in pairs) == 1
    negatives = {text for _, text, label in pairs if label == 0}
    assert "Boats are registered at a DMV office." in negatives
    assert "The plate must be displayed on the rear." in negatives  # the neighbouring fact
    assert len(pairs) == 1 + 4  # every retrieved non-answer sentence once, the page's nearest already among them


def test_given_few_retrieved_negatives_allowed_when_building_pairs_then_the_ones_sharing_most_words_come_first():
    page = _sentences("dmv/moped.txt", PAGE)
    retrieved = [{"file": "dmv/boat.txt", "start": 0, "end": 30, "text": "Boats are registered at a DMV office."},
                 {"file": "dmv/boat.txt", "start": 40, "end": 90, "text": "The boat registration fee depends on length."}]

    pairs = question_pairs("What is the moped registration fee?", retrieved, page, gold_file="dmv/moped.txt",
                           answer_start=FEE_START, answer_end=FEE_END, max_retrieved=1, max_page=0,
                           rng=random.Random(0))

    assert [(text, label) for _, text, label in pairs] == [
        ("You must pay the registration fee and sales tax.", 1),
        ("The boat registration fee depends on length.", 0),  # shares "registration" and "fee"
    ]


def test_given_no_located_answer_sentence_when_building_pairs_then_none_are_made():
    page = _sentences("dmv/moped.txt", PAGE)

    assert question_pairs("q", page, page, gold_file="dmv/other.txt", answer_start=FEE_START, answer_end=FEE_END,
                          max_retrieved=5, max_page=5, rng=random.Random(0)) == []


def test_given_scores_when_choosing_the_threshold_then_it_is_the_highest_that_answers_enough():
    answerable = [0.9, 0.8, 0.7, 0.2, float("-inf")]
    near_miss = [0.75, 0.1, 0.3]

    assert choose_threshold(answerable, near_miss, min_answered=0.6) == 0.7
    assert choose_threshold(answerable, near_miss, min_answered=0.9) == float("-inf")
    assert decisions_curve(answerable, near_miss, [0.7]) == [{"threshold": 0.7, "answered": 0.6, "declined": 2 / 3}]
