"""Measure the abstention signal: the closest retrieved chunk's cosine distance, for answerable
questions (Doc2Dial development questions over the ingested Doc2Dial pages) against clearly unrelated
questions (``benchmarks/data/unrelated_questions.txt``), retrieved exactly as the answer pipeline does
(``retrieval_query`` over the history, ``chunk_search`` with ``RETRIEVAL_K``). No model is run.

Prints the distance distributions and, for a sweep of thresholds, the share of answerable questions
that would be answered, the share of unrelated questions that would be declined, and, for answerable
questions, how often the gold passage is among the prompt's sources of those answered.

    DATABASE_NAME=chatdev python benchmarks/abstention_threshold.py \
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial [--limit 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402

from chat.services import best_vector_distance  # noqa: E402
from knowledge.evaluation import RankedPassage, load_questions, passage_hit, percentile  # noqa: E402
from knowledge.selectors import chunk_search, retrieval_query  # noqa: E402


def describe(label: str, values: list[float]) -> str:
    if not values:
        return f"| {label} | 0 | | | | | | |"
    return (f"| {label} | {len(values)} | {min(values):.3f} | {percentile(values, 5):.3f} | {percentile(values, 50):.3f} "
            f"| {statistics.fmean(values):.3f} | {percentile(values, 95):.3f} | {max(values):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--unrelated", default=str(ROOT / "benchmarks" / "data" / "unrelated_questions.txt"))
    parser.add_argument("--collection", default=None)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()

    root = Path(args.questions).resolve().parent
    questions = load_questions(args.questions, limit=args.limit)
    unrelated = [line.strip() for line in open(args.unrelated, encoding="utf-8")
                 if line.strip() and not line.startswith("#")]

    def relative(uri: str) -> str:
        try:
            return str(Path(uri).resolve().relative_to(root))
        except ValueError:
            return uri

    answerable: dict[str, list[tuple[float, bool]]] = {"first turns": [], "all turns": []}
    for question in questions:
        chunks = chunk_search(retrieval_query(question.question, question.history),
                              k=settings.RETRIEVAL_K, collection=args.collection)
        distance = best_vector_distance(chunks)
        if distance is None:
            distance = 2.0
        in_prompt = any(passage_hit(RankedPassage(relative(c.source_uri), c.start, c.end), question)
                        for c in chunks[: settings.LLM_PROMPT_SOURCES])
        answerable["all turns"].append((distance, in_prompt))
        if question.is_first_turn:
            answerable["first turns"].append((distance, in_prompt))
    unrelated_distances = []
    for text in unrelated:
        distance = best_vector_distance(chunk_search(text, k=settings.RETRIEVAL_K, collection=args.collection))
        unrelated_distances.append(2.0 if distance is None else distance)

    print(f"closest-chunk cosine distance (RETRIEVAL_K={settings.RETRIEVAL_K}, collection={args.collection})\n")
    print("| questions | n | min | p5 | p50 | mean | p95 | max |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, rows in answerable.items():
        print(describe(f"answerable, {label}", [d for d, _ in rows]))
    print(describe("unrelated", unrelated_distances))

    print("\n| threshold | answered (first turns) | answered (all turns) | gold passage in prompt, answered first turns "
          "| declined (unrelated) |")
    print("|---:|---:|---:|---:|---:|")
    for threshold in [0.40, 0.45, 0.50, 0.55, 0.60, 0.62, 0.65, 0.68, 0.70, 0.75, 0.80]:
        first = answerable["first turns"]
        answered_first = [hit for d, hit in first if d <= threshold]
        share_all = sum(d <= threshold for d, _ in answerable["all turns"]) / max(len(answerable["all turns"]), 1)
        declined = sum(d > threshold for d in unrelated_distances) / max(len(unrelated_distances), 1)
        hits = sum(answered_first) / max(len(answered_first), 1)
        marker = " (setting)" if abs(threshold - settings.ABSTAIN_MAX_DISTANCE) < 1e-9 else ""
        print(f"| {threshold:.2f}{marker} | {len(answered_first) / max(len(first), 1):.3f} | {share_all:.3f} "
              f"| {hits:.3f} | {declined:.3f} |")


if __name__ == "__main__":
    main()
