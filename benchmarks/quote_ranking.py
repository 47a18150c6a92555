"""Choose how the quoted source sentence is ranked (``chat.grounding.extractive_answer``), by
measurement on one half of the Doc2Dial dialogues, without the language model.

Step 1 (cached in ``--cache``): every question is retrieved as the pipeline retrieves it
(``knowledge.selectors.conversation_search`` with its history, ``closest_among_sources``, the
abstention check; curated answers left out), and the quotable chunks are recorded (title, headings, excerpt, whether the chunk
is on the gold span). Step 2 (fast): for each ranking configuration (keyword arguments of
``extractive_answer``, ``--configs`` as JSON) the quote is chosen twice: at
``ANSWER_QUOTE_MIN_RELEVANCE`` (quote first: the model is not asked) and at
``EXTRACTIVE_MIN_RELEVANCE`` (the fallback when nothing the model wrote passes the check). Printed per
configuration: the share of questions quoted at once and their token-F1, and the share answered and
token-F1 (declined = 0) when every question not quoted at once falls back to a quote (the model's
own answers, ~10 % of the pipeline's, are left out: this ranks quotes, ``evaluate_answers`` measures
the pipeline); the extractive baseline of the same retrieval (the closest sentence, always
answering) beside them, and the same for the how-to questions (``asks_how_to``). Re-ranking never
changes which sentences qualify, so the shares answered only move with a configuration that filters.

    EMBEDDED_SERVICES=1 DATABASE_NAME=bench python benchmarks/quote_ranking.py \\
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial --split tune \\
        --first-turns 1000 --follow-ups 2000 --stride 1 --cache /tmp/quote_ranking_tune.json \\
        --configs '[{"name": "old", "context_weight": 0, "instruction_weight": 0}, {"name": "settings"}]'

(all 1,110 tune questions: retrieval ~1 min, each configuration ~30 s on 2 cores.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402

from chat.answer_metrics import closest_sentence_baseline, token_f1  # noqa: E402
from chat.grounding import GroundingCheck, asks_how_to, extractive_answer  # noqa: E402
from chat.prompts import source_excerpt, without_markers  # noqa: E402
from chat.services.answers import closest_among_sources  # noqa: E402
from knowledge.embedding import get_embedding_model  # noqa: E402
from knowledge.evaluation import RankedPassage, load_questions, passage_hit  # noqa: E402
from knowledge.selectors import conversation_search  # noqa: E402

DEFAULT_CONFIGS = '[{"name": "settings"}]'


def collect(args) -> list[dict]:
    """Retrieve every chosen question once, as ``answer_compose`` does; returns the records."""
    root = Path(args.questions).resolve().parent
    gold = [q for q in load_questions(args.questions) if q.split == args.split]
    chosen = [q for q in gold if q.is_first_turn][: args.first_turns]
    chosen += [q for q in gold if not q.is_first_turn][:: args.stride][: args.follow_ups]
    encoder = get_embedding_model()
    records, started = [], time.perf_counter()
    for index, q in enumerate(chosen, start=1):
        found = conversation_search(q.question, list(q.history), k=settings.RETRIEVAL_K, collection=args.collection,
                                    question_embedding=encoder.encode([q.question.strip()])[0],
                                    exclude_kinds=("curated",))
        chunks = closest_among_sources(found.chunks, settings.LLM_PROMPT_SOURCES)
        quotable = chunks[: max(settings.EXTRACTIVE_SOURCES, settings.LLM_PROMPT_SOURCES)]

        def relative(uri):
            try:
                return str(Path(uri).resolve().relative_to(root))
            except ValueError:
                return uri

        records.append({
            "qid": q.qid, "question": q.question, "reference": q.reference_answer, "first_turn": q.is_first_turn,
            "topic": found.query if found.reads_history else None,
            "declined_by_retrieval": found.distance is None or found.distance > settings.ABSTAIN_MAX_DISTANCE,
            "sources": [{"title": without_markers(c.source_title), "headings": list(c.heading_path),
                         "excerpt": source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS),
                         "hit": passage_hit(RankedPassage(relative(c.source_uri), c.start, c.end), q)}
                        for c in quotable],
        })
        if index % 25 == 0:
            print(f"{index}/{len(chosen)} retrieved ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
                  flush=True)
    return records


class CachedEncoder:
    """The product's embedding model with a per-text cache (every configuration embeds the same texts)."""

    def __init__(self):
        self.model = get_embedding_model()
        self.cache: dict[str, object] = {}

    def __call__(self, texts):
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, vector in zip(missing, self.model.encode(missing)):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--split", choices=["tune", "heldout"], default="tune")
    parser.add_argument("--first-turns", type=int, default=150)
    parser.add_argument("--follow-ups", type=int, default=150, help="later turns (every --stride-th), up to this many")
    parser.add_argument("--stride", type=int, default=7)
    parser.add_argument("--cache", default=None, help="JSON file of step 1's records (read if present, else written)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help='JSON list of {"name", ...extractive_answer keyword arguments}')
    args = parser.parse_args()

    if args.cache and Path(args.cache).exists():
        records = json.loads(Path(args.cache).read_text())
    else:
        records = collect(args)
        if args.cache:
            Path(args.cache).write_text(json.dumps(records))
    encode = CachedEncoder()
    checks = []
    for r in records:
        if r["declined_by_retrieval"] or not r["sources"]:
            checks.append(None)
            continue
        checks.append(GroundingCheck(
            r["question"], [s["excerpt"] for s in r["sources"]], titles=[s["title"] for s in r["sources"]],
            headings=[" > ".join(s["headings"]) for s in r["sources"]], topic=r["topic"],
            prompt_sources=settings.LLM_PROMPT_SOURCES, encode=encode))
    mean = statistics.fmean
    print(f"\n{args.split}: {len(records)} questions ({sum(r['first_turn'] for r in records)} first turns), "
          f"{sum(c is None for c in checks)} declined by retrieval\n")
    print("| configuration | group | quoted at once | F1 of those | answered (quote or fallback quote) | F1 (declined 0) "
          "| extractive baseline F1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for config in json.loads(args.configs):
        name = config.pop("name")
        rows = []
        for r, check in zip(records, checks):
            if check is None:
                rows.append({"first": r["first_turn"], "how_to": asks_how_to(r["question"]), "at_once": None,
                             "answer": None, "baseline": 0.0})
                continue
            at_once = extractive_answer(check, min_relevance=settings.ANSWER_QUOTE_MIN_RELEVANCE, **config)
            answer = at_once or extractive_answer(check, min_relevance=settings.EXTRACTIVE_MIN_RELEVANCE, **config)
            baseline = closest_sentence_baseline(check)
            rows.append({"first": r["first_turn"], "how_to": asks_how_to(r["question"]),
                         "at_once": None if at_once is None else token_f1(at_once.text, r["reference"]),
                         "answer": None if answer is None else token_f1(answer.text, r["reference"]),
                         "baseline": token_f1(baseline, r["reference"]) if baseline else 0.0})
        for group, members in (("first turns", [x for x in rows if x["first"]]),
                               ("follow-ups", [x for x in rows if not x["first"]]), ("all", rows),
                               ("how-to questions (asks_how_to)", [x for x in rows if x["how_to"]])):
            if not members:
                continue
            quoted = [x["at_once"] for x in members if x["at_once"] is not None]
            answered = [x for x in members if x["answer"] is not None]
            print(f"| {name} | {group} ({len(members)}) | {len(quoted) / len(members):.3f} | "
                  f"{mean(quoted) if quoted else 0.0:.3f} | {len(answered) / len(members):.3f} | "
                  f"{mean([x['answer'] or 0.0 for x in members]):.3f} | {mean([x['baseline'] for x in members]):.3f} |")


if __name__ == "__main__":
    main()
