"""Answer-quality metrics shared by ``manage.py evaluate_answers`` and the tuning evaluation gate.

token-F1 follows the SQuAD v1.1 evaluation script (Rajpurkar et al., 2016): lower case, punctuation
and articles removed, whitespace tokens, F1 of the bag-of-tokens overlap. Citation markers (``[n]``)
are removed first.
"""

from __future__ import annotations

import collections
import re
import string

from chat.citations import MARKER

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(text: str) -> list[str]:
    """SQuAD v1.1 normalisation (lower case, no punctuation, no articles), split on whitespace."""
    text = MARKER.sub(" ", text).lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Token-level F1 (0..1) of ``prediction`` against ``reference`` (SQuAD v1.1 evaluation script)."""
    predicted, gold = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def invented_facts(answer: str, sources: list[str]) -> list[str]:
    """Hard facts of ``answer`` (links, e-mail addresses, phone numbers, numbers and quantities,
    months, codes; ``chat.grounding.hard_facts``) that none of ``sources`` contains, as readable
    strings such as ``"link example.com"`` or ``"number 6"``; ``[]`` when every fact is present."""
    from chat.grounding import hard_facts, merge_facts

    return hard_facts(answer).missing_from(merge_facts([hard_facts(text) for text in sources]))


def closest_sentence_baseline(check) -> str:
    """The extractive baseline answers are compared with (issue 9): the sentence of the check's
    sources (``chat.grounding.GroundingCheck``: the prompt's top retrieved chunks) closest to the
    question by the product's embedding model, with no threshold, type or other filter; ``""``
    without sources."""
    best, best_score = "", None
    for source in check.sources:
        if not len(source.vectors):
            continue
        scores = source.vectors @ check.question_vector
        for sentence, score in zip(source.sentences, scores):
            if best_score is None or float(score) > best_score:
                best, best_score = sentence.strip(), float(score)
    return best
