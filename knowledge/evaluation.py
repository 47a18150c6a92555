"""Retrieval evaluation against questions with gold passages (Doc2Dial's format).

A question file is JSON lines with ``question``, ``history`` (earlier turns, oldest first),
``is_first_turn``, ``gold_file`` (relative to the file's folder) and the gold span
``[answer_start, answer_end)`` in that file's text. A retrieved chunk *hits* when it comes from
``gold_file`` and its character range overlaps the gold span; a *document hit* is any chunk from
``gold_file`` (the data set's README defines both).

Metrics: passage-hit@k and document-hit@k (share of questions with a hit in the top k) and MRR
(mean of 1/rank of the first passage hit within the top ``k_max``, 0 when none).
The baseline is plain BM25 (Okapi, k1=1.5, b=0.75; ``rank_bm25``) over the same chunks.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

KS = (1, 5, 10)
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class GoldQuestion:
    """One evaluation question; ``gold_file`` is relative to the questions file's folder."""

    qid: str
    question: str
    history: tuple[dict, ...]
    is_first_turn: bool
    gold_file: str
    answer_start: int
    answer_end: int
    reference_answer: str = ""
    dialogue: str = ""

    @property
    def split(self) -> str:
        """``"tune"`` or ``"heldout"``: a fixed half of the dialogues (SHA-256 of the dialogue id, or of
        the question id without one), so thresholds chosen on one half are reported on the other and
        no dialogue is in both."""
        return dialogue_split(self.dialogue or self.qid)


@dataclass(frozen=True)
class RankedPassage:
    """A ranked result reduced to what scoring needs: its file (relative path) and span."""

    file: str
    start: int
    end: int


def load_questions(path: str | Path, *, limit: int | None = None) -> list[GoldQuestion]:
    """Read a JSON-lines question file; raises ``FileNotFoundError``/``ValueError`` for a missing
    file or a row without the required fields."""
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                questions.append(
                    GoldQuestion(
                        qid=str(row["qid"]),
                        question=row["question"],
                        history=tuple(row.get("history") or ()),
                        is_first_turn=bool(row.get("is_first_turn", not row.get("history"))),
                        gold_file=row["gold_file"],
                        answer_start=int(row["answer_start"]),
                        answer_end=int(row["answer_end"]),
                        reference_answer=row.get("reference_answer", ""),
                        dialogue=str(row.get("dial_id", "")),
                    )
                )
            except KeyError as error:
                raise ValueError(f"{path}:{line_number}: missing field {error}") from None
            if limit and len(questions) >= limit:
                break
    return questions


def dialogue_split(dialogue: str) -> str:
    """``"tune"`` for dialogues whose SHA-256 starts with an even byte, else ``"heldout"``."""
    import hashlib

    return "tune" if hashlib.sha256(dialogue.encode()).digest()[0] % 2 == 0 else "heldout"


def passage_hit(passage: RankedPassage, question: GoldQuestion) -> bool:
    """Whether ``passage`` comes from the gold file and overlaps the gold span."""
    return (
        passage.file == question.gold_file
        and passage.start < question.answer_end
        and passage.end > question.answer_start
    )


@dataclass
class RetrievalScores:
    """Aggregated metrics over ``n`` questions (shares in 0..1) and latencies in milliseconds."""

    n: int = 0
    passage_hit: dict[int, float] = field(default_factory=dict)
    document_hit: dict[int, float] = field(default_factory=dict)
    mrr: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def score_rankings(
    questions: Sequence[GoldQuestion], rankings: Sequence[Sequence[RankedPassage]],
    latencies_ms: Sequence[float] = (), ks: Sequence[int] = KS,
) -> RetrievalScores:
    """Score one ranking (best first) per question."""
    scores = RetrievalScores(n=len(questions))
    if not questions:
        return scores
    k_max = max(ks)
    reciprocal = []
    passage_counts = {k: 0 for k in ks}
    document_counts = {k: 0 for k in ks}
    for question, ranking in zip(questions, rankings):
        first_passage = next((i for i, p in enumerate(ranking[:k_max]) if passage_hit(p, question)), None)
        first_document = next(
            (i for i, p in enumerate(ranking[:k_max]) if p.file == question.gold_file), None
        )
        reciprocal.append(0.0 if first_passage is None else 1.0 / (first_passage + 1))
        for k in ks:
            passage_counts[k] += first_passage is not None and first_passage < k
            document_counts[k] += first_document is not None and first_document < k
    scores.passage_hit = {k: passage_counts[k] / len(questions) for k in ks}
    scores.document_hit = {k: document_counts[k] / len(questions) for k in ks}
    scores.mrr = statistics.fmean(reciprocal)
    scores.latency_p50_ms = percentile(latencies_ms, 50)
    scores.latency_p95_ms = percentile(latencies_ms, 95)
    return scores


def run_retriever(
    questions: Sequence[GoldQuestion],
    retrieve: Callable[[GoldQuestion], list[RankedPassage]],
) -> tuple[list[list[RankedPassage]], list[float]]:
    """Run ``retrieve`` on each question; returns the rankings and wall-clock latencies (ms)."""
    rankings, latencies = [], []
    for question in questions:
        started = time.perf_counter()
        rankings.append(retrieve(question))
        latencies.append((time.perf_counter() - started) * 1000)
    return rankings, latencies


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens for the BM25 baseline."""
    return [word.lower() for word in _WORD.findall(text)]


class BM25Baseline:
    """Plain BM25 (Okapi) over passages ``(file, start, end, text)``, via ``rank_bm25``."""

    def __init__(self, passages: Sequence[tuple[str, int, int, str]]):
        from rank_bm25 import BM25Okapi

        self.passages = [RankedPassage(file, start, end) for file, start, end, _ in passages]
        self.index = BM25Okapi([tokenize(text) for *_, text in passages])

    def search(self, query: str, k: int) -> list[RankedPassage]:
        """The ``k`` best passages for ``query``, best first."""
        import numpy as np

        scores = self.index.get_scores(tokenize(query))
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.passages[i] for i in top]


def format_table(columns: dict[str, RetrievalScores], ks: Sequence[int] = KS) -> str:
    """A Markdown table with one row per metric and one column per system."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("questions", [str(columns[n].n) for n in names])
    for k in ks:
        row(f"passage-hit@{k}", [f"{columns[n].passage_hit.get(k, 0):.3f}" for n in names])
    for k in ks:
        row(f"document-hit@{k}", [f"{columns[n].document_hit.get(k, 0):.3f}" for n in names])
    row(f"MRR@{max(ks)}", [f"{columns[n].mrr:.3f}" for n in names])
    row("latency p50 (ms)", [f"{columns[n].latency_p50_ms:.1f}" for n in names])
    row("latency p95 (ms)", [f"{columns[n].latency_p95_ms:.1f}" for n in names])
    return "\n".join(lines)
