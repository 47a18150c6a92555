"""Choose the groundedness check's thresholds by measurement, and report them on held-out dialogues.

Step 1 (slow, cached in ``--cache``): every question is answered through the pipeline's own
``answer_compose`` with the check switched off (``grounding=False``), recording the model's raw text,
the prompt's sources and the retrieval decision. Questions: Doc2Dial development questions (first
turns and follow-ups with their history) from both halves of the dialogues (``GoldQuestion.split``:
``tune`` and ``heldout``), near-miss questions (on-topic, not answered by any page:
``benchmarks/data/near_miss_doc2dial.jsonl``) and unrelated ones (``unrelated_questions.txt``).

Step 2 (fast): the raw answers are replayed through the pipeline's policy (``replay``: quote first,
else the model's text through ``SentenceGate``, else a quote, else decline) for a grid of thresholds, and each configuration is scored per split: answerable questions answered,
token-F1 of the shown answer (declined = 0) beside the extractive baseline of the same retrieval (the
source sentence closest to the question, always answering), near-miss and unrelated questions
declined, invented facts in shown answers, the method mix and the share of sentences shown.

    DATABASE_NAME=chatdev python benchmarks/grounding_thresholds.py \
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial \
        --first-turns 60 --follow-ups 30 --cache /tmp/grounding_raw.json
"""

from __future__ import annotations

import argparse
import itertools
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

from chat import services  # noqa: E402
from chat.answer_metrics import closest_sentence_baseline, invented_facts, token_f1  # noqa: E402
from chat.grounding import GroundingCheck, SentenceGate, Thresholds, extractive_answer  # noqa: E402
from chat.prompts import source_excerpt, without_markers  # noqa: E402
from knowledge.embedding import get_embedding_model  # noqa: E402
from knowledge.evaluation import RankedPassage, load_questions, passage_hit  # noqa: E402


def collect(args, cached: list[dict]) -> list[dict]:
    """Answer every question once with the check off; returns the records (see the module docstring),
    reusing ``cached`` records of the same question id and kind."""
    root = Path(args.questions).resolve().parent
    gold = load_questions(args.questions)
    chosen = []
    for split in ("tune", "heldout"):
        firsts = [q for q in gold if q.split == split and q.is_first_turn][: args.first_turns]
        follow = [q for q in gold if q.split == split and not q.is_first_turn][:: 7][: args.follow_ups]
        chosen += [("answerable", split, q) for q in firsts + follow]
    near = ([json.loads(line) for line in open(args.near_miss, encoding="utf-8") if line.strip()]
            if Path(args.near_miss).exists() else [])
    unrelated = [line.strip() for line in open(args.unrelated, encoding="utf-8") if line.strip() and not line.startswith("#")]
    items = [(kind, split, q) for kind, split, q in chosen]
    items += [("near_miss", "tune" if i % 2 == 0 else "heldout", {"question": r["question"], "qid": r["qid"]})
              for i, r in enumerate(near)]
    items += [("unrelated", "tune" if i % 2 == 0 else "heldout", {"question": text, "qid": f"u{i}"})
              for i, text in enumerate(unrelated[: args.unrelated_limit])]
    known = {(r["kind"], r["qid"]): r for r in cached}
    records = []
    started = time.perf_counter()
    for index, (kind, split, q) in enumerate(items, start=1):
        if (kind, q.qid if kind == "answerable" else q["qid"]) in known:
            records.append(known[(kind, q.qid if kind == "answerable" else q["qid"])])
            continue
        question = q.question if kind == "answerable" else q["question"]
        history = list(q.history) if kind == "answerable" else []
        composed = None
        for event in services.answer_compose(question, history=history, collection=args.collection, grounding=False):
            if event.type == "answer.composed":
                composed = event.data["answer"]
        if composed is None:
            raise SystemExit(f"no answer for {question!r}")

        def relative(uri):
            try:
                return str(Path(uri).resolve().relative_to(root))
            except ValueError:
                return uri

        record = {
            "kind": kind, "split": split, "qid": q.qid if kind == "answerable" else q["qid"], "question": question,
            "first_turn": kind != "answerable" or q.is_first_turn,
            "reference": q.reference_answer if kind == "answerable" else "",
            "topic": composed.grounding.get("query") if composed.grounding.get("follow_up") else None,
            "declined_by_retrieval": composed.abstained, "raw": "" if composed.abstained else composed.text,
            "ttft_ms": composed.timings.get("ttft_ms"),
            "sources": [{"title": without_markers(c.source_title), "excerpt": source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS),
                         "hit": kind == "answerable" and passage_hit(RankedPassage(relative(c.source_uri), c.start, c.end), q)}
                        for c in composed.sources],
        }
        records.append(record)
        if args.cache and index % 10 == 0:
            Path(args.cache).write_text(json.dumps(records))
        if index % 10 == 0:
            print(f"{index}/{len(items)} answered ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return records


class CachedEncoder:
    """The product's embedding model with a per-text cache (the replay embeds the same texts per config)."""

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


def replay(record: dict, thresholds: Thresholds, extractive_min: float, quote_min: float, encode) -> dict:
    """The outcome of one record under the pipeline's policy (``chat.services.answer_compose``): quote a
    source sentence within ``quote_min`` of the question at once; else the model's checked text; else
    a quote within ``extractive_min``; else decline."""
    if record["declined_by_retrieval"] or not record["sources"]:
        return {"method": "declined", "text": "", "sentences": 0, "shown": 0, "baseline": ""}
    excerpts = [s["excerpt"] for s in record["sources"]]
    check = GroundingCheck(record["question"], excerpts, titles=[s["title"] for s in record["sources"]],
                           topic=record.get("topic"), thresholds=thresholds, encode=encode)
    outcome = {"sentences": 0, "shown": 0, "baseline": closest_sentence_baseline(check)}
    quote = extractive_answer(check, min_relevance=quote_min)
    if quote is not None:
        outcome.update(method="extractive", text=quote.text)
    else:
        gate = SentenceGate(check)
        text = gate.feed(record["raw"]) + gate.finish()
        outcome.update(sentences=len(gate.verdicts), shown=sum(v.shown for v in gate.verdicts))
        if text.strip():
            outcome.update(method="generated", text=text)
        else:
            quote = extractive_answer(check, min_relevance=extractive_min)
            outcome.update(method="extractive" if quote else "declined", text=quote.text if quote else "")
    outcome["invented"] = invented_facts(outcome["text"], [f"{s['title']}. {s['excerpt']}" for s in record["sources"]])
    return outcome


def score(records: list[dict], outcomes: list[dict]) -> dict:
    answerable = [(r, o) for r, o in zip(records, outcomes) if r["kind"] == "answerable"]
    near = [o for r, o in zip(records, outcomes) if r["kind"] == "near_miss"]
    unrelated = [o for r, o in zip(records, outcomes) if r["kind"] == "unrelated"]
    answered = [(r, o) for r, o in answerable if o["method"] != "declined"]
    f1 = [token_f1(o["text"], r["reference"]) if o["method"] != "declined" else 0.0 for r, o in answerable]
    raw_f1 = [token_f1(r["raw"], r["reference"]) if r["raw"] else 0.0 for r, o in answerable]
    base = [token_f1(o["baseline"], r["reference"]) if o["baseline"] else 0.0 for r, o in answerable]
    sentences = sum(o["sentences"] for _, o in answerable)
    mean = statistics.fmean
    return {
        "n": len(answerable), "answered": len(answered) / max(1, len(answerable)),
        "f1": mean(f1) if f1 else 0.0, "f1_answered": mean([token_f1(o["text"], r["reference"]) for r, o in answered]) if answered else 0.0,
        "raw_f1": mean(raw_f1) if raw_f1 else 0.0, "baseline_f1": mean(base) if base else 0.0,
        "near_declined": sum(o["method"] == "declined" for o in near) / max(1, len(near)), "near_n": len(near),
        "unrelated_declined": sum(o["method"] == "declined" for o in unrelated) / max(1, len(unrelated)),
        "extractive": sum(o["method"] == "extractive" for _, o in answerable) / max(1, len(answerable)),
        "generated": sum(o["method"] == "generated" for _, o in answerable) / max(1, len(answerable)),
        "shown_share": sum(o["shown"] for _, o in answerable) / max(1, sentences),
        "invented": sum(len(o.get("invented", [])) for o in outcomes),
        "raw_invented": sum(len(invented_facts(r["raw"], [f"{s['title']}. {s['excerpt']}" for s in r["sources"]]))
                            for r in records if r["raw"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--first-turns", type=int, default=60, help="first-turn questions per split")
    parser.add_argument("--follow-ups", type=int, default=30, help="follow-up questions per split")
    parser.add_argument("--near-miss", default=str(ROOT / "benchmarks" / "data" / "near_miss_doc2dial.jsonl"))
    parser.add_argument("--unrelated", default=str(ROOT / "benchmarks" / "data" / "unrelated_questions.txt"))
    parser.add_argument("--unrelated-limit", type=int, default=20)
    parser.add_argument("--cache", default=None, help="JSON file of step 1's records (read if present, else written)")
    parser.add_argument("--coverage", default="0.5,0.6,0.7")
    parser.add_argument("--similarity", default="0.4,0.5,0.6")
    parser.add_argument("--relevance", default="0.2,0.3,0.4")
    parser.add_argument("--extractive", default="0.3,0.4,0.5")
    parser.add_argument("--quote", default="0.5,0.6,0.7,2", help="ANSWER_QUOTE_MIN_RELEVANCE values (2: never quote first)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--collect-only", action="store_true", help="only step 1")
    args = parser.parse_args()

    cached = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else []
    records = collect(args, cached)
    if args.cache:
        Path(args.cache).write_text(json.dumps(records))
    if args.collect_only:
        return
    encode = CachedEncoder()
    grid = list(itertools.product(*(map(float, getattr(args, name).split(","))
                                    for name in ("coverage", "similarity", "relevance", "extractive", "quote"))))
    rows = []
    for coverage, similarity, relevance, extractive, quote in grid:
        thresholds = Thresholds(min_coverage=coverage, min_similarity=similarity, min_relevance=relevance,
                                min_words=settings.GROUNDING_MIN_WORDS)
        outcomes = [replay(r, thresholds, extractive, quote, encode) for r in records]
        by_split = {split: score([r for r in records if r["split"] == split],
                                 [o for r, o in zip(records, outcomes) if r["split"] == split])
                    for split in ("tune", "heldout")}
        rows.append(((coverage, similarity, relevance, extractive, quote), by_split))
    header = ("| coverage | similarity | relevance | extractive | quote first | answered | F1 (declined 0) | F1 answered | extractive "
              "baseline F1 | raw model F1 | near-miss declined | unrelated declined | generated / extractive | "
              "sentences shown | invented facts shown (raw) |")
    rule = "|" + "---:|" * 15
    for split in ("tune", "heldout"):
        print(f"\n### {split} split ({rows[0][1][split]['n']} answerable, {rows[0][1][split]['near_n']} near-miss)\n")
        print(header)
        print(rule)
        ordered = sorted(rows, key=lambda row: -(row[1]["tune"]["f1"] + 0.5 * row[1]["tune"]["near_declined"]))
        for config, by_split in ordered[: args.top]:
            m = by_split[split]
            print(f"| {config[0]} | {config[1]} | {config[2]} | {config[3]} | {config[4]} | {m['answered']:.3f} | {m['f1']:.3f} | "
                  f"{m['f1_answered']:.3f} | {m['baseline_f1']:.3f} | {m['raw_f1']:.3f} | {m['near_declined']:.3f} | "
                  f"{m['unrelated_declined']:.3f} | {m['generated']:.2f} / {m['extractive']:.2f} | {m['shown_share']:.3f} | "
                  f"{m['invented']} ({m['raw_invented']}) |")


if __name__ == "__main__":
    main()
