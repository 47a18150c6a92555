"""Curated answers on Doc2Dial: how often an approved correction answers a later question at once, how
well, and whether an unrelated question ever matches one, over a sweep of match thresholds.

Seeds approved corrections with ``tuning.seeding.training_data_seed`` (what ``manage.py
seed_training_data`` runs; each becomes a curated answer through ``tuning.services.correction_curate``)
from the first turns of the "tune" half of the dialogues (``GoldQuestion.split``), then asks, with the
pipeline's own rule (``chat.services.curated_lookup``: only questions that stand on their own are
matched: a conversation's first question, within a cosine distance of a curated question; with
``--any-turn``, any question that does not refer back, the rule measured first):

- the corrected questions again (exact repeats; sanity check);
- hand-written paraphrases of 30 corrected questions (``benchmarks/data/doc2dial_paraphrases.jsonl``);
- the later turns of the corrected dialogues, with their history (the issue's "held-out questions
  whose dialogue's earlier question was corrected");
- the first turns of the held-out half of the dialogues (other customers; Doc2Dial has many dialogues
  per page, so some ask what a corrected question asked);
- the unrelated questions of ``benchmarks/data/unrelated_questions.txt`` (must never match).

For each threshold: questions served from a curated entry, their token-F1 against the question's own
reference answer (SQuAD v1.1, ``chat.answer_metrics.token_f1``), and how many of the served answers
cite a passage overlapping the question's gold span ("evidence on gold"). With ``--baseline-upto D``
the later turns and held-out first turns served within distance D are also answered by the pipeline
without curated answers (``answer_compose(curated=False)``: retrieval, quote or the real GGUF model,
the groundedness check), token-F1 side by side per band of distance.

    EMBEDDED_SERVICES=1 DATABASE_NAME=curatedbench python benchmarks/curated_answers.py \\
        --questions ../shared/data/doc2dial/questions_dev.jsonl --collection doc2dial [--baseline-upto 0.3]

(after ``manage.py ingest ../shared/data/doc2dial/docs --collection doc2dial`` into that database;
seeding twice adds nothing.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import PROJECT_ROOT, django_setup, header, progress  # noqa: E402

django_setup()

from django.conf import settings  # noqa: E402

from chat.answer_metrics import token_f1  # noqa: E402
from chat.services import answer_compose, curated_lookup, curated_reply  # noqa: E402
from knowledge.evaluation import GoldQuestion, RankedPassage, load_questions, passage_hit, percentile  # noqa: E402
from knowledge.selectors import curated_answer_match, is_follow_up  # noqa: E402
from tuning.models import Correction  # noqa: E402
from tuning.seeding import dialogue_of, training_data_seed  # noqa: E402

THRESHOLDS = "0.10,0.15,0.20,0.25,0.30,0.35,0.40"


def relative(uri: str, root: Path) -> str:
    try:
        return str(Path(uri).resolve().relative_to(root))
    except ValueError:
        return uri


def ask(text: str, history, collection: str, limit: float, gold: GoldQuestion | None, root: Path,
        any_turn: bool = False) -> dict:
    """One lookup as the pipeline does it (``curated_lookup``: first questions only), or with
    ``any_turn`` for every question that does not refer back (``is_follow_up``; the rule measured
    before): ``{"distance", "text", "on_gold", "curated_id", "ms", "looked_up"}`` (distance ``None``
    when nothing is within ``limit``)."""
    started = time.perf_counter()
    if any_turn:
        looked_up = not (history and is_follow_up(text))
        match = curated_answer_match(text, collection=collection, max_distance=limit) if looked_up else None
    else:
        looked_up = not any(turn.get("role") == "user" for turn in history)
        match = curated_lookup(text, history=list(history), collection=collection, max_distance=limit)
    ms = (time.perf_counter() - started) * 1000
    if match is None:
        return {"distance": None, "text": "", "on_gold": False, "curated_id": None, "ms": ms, "looked_up": looked_up}
    events = list(curated_reply(match, question=text))
    served = events[-1].data["answer"].text
    on_gold = gold is not None and any(
        passage_hit(RankedPassage(relative(c.source_uri, root), c.start, c.end), gold) for c in match.evidence)
    return {"distance": match.distance, "text": served, "on_gold": on_gold, "curated_id": match.curated_id, "ms": ms,
            "looked_up": looked_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--docs-root", help="folder gold_file paths are relative to (default: the file's folder)")
    parser.add_argument("--unrelated", default=str(PROJECT_ROOT / "benchmarks" / "data" / "unrelated_questions.txt"))
    parser.add_argument("--paraphrases", default=str(PROJECT_ROOT / "benchmarks" / "data" / "doc2dial_paraphrases.jsonl"))
    parser.add_argument("--thresholds", default=THRESHOLDS, help="cosine distances to sweep, comma-separated")
    parser.add_argument("--any-turn", action="store_true",
                        help="match every question that does not refer back, not only first questions (the rule "
                             "measured before; shows why later turns are not matched)")
    parser.add_argument("--baseline-upto", type=float, default=0.0,
                        help="answer the questions served up to this distance without curated answers too (runs "
                             "the pipeline and the model; 0: off)")
    args = parser.parse_args()

    path = Path(args.questions).resolve()
    root = Path(args.docs_root).resolve() if args.docs_root else path.parent
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    limit = max(thresholds)
    questions = load_questions(path)
    unrelated = [line.strip() for line in open(args.unrelated, encoding="utf-8")
                 if line.strip() and not line.startswith("#")]
    paraphrases = [json.loads(line) for line in open(args.paraphrases, encoding="utf-8") if line.strip()]
    by_qid = {q.qid: q for q in questions}

    print(header("Curated answers on Doc2Dial (benchmarks/curated_answers.py)", [
        ("questions", f"{path} ({len(questions)})"), ("collection", args.collection),
        ("thresholds", ", ".join(f"{t:.2f}" for t in thresholds)),
        ("default", f"CURATED_MATCH_MAX_DISTANCE={settings.CURATED_MATCH_MAX_DISTANCE}"),
    ]))

    # 1. seed approved corrections (and so curated answers) from the tune half's first turns
    seeded_questions = [q for q in questions if q.is_first_turn and q.split == "tune"]
    progress(f"seeding {len(seeded_questions)} corrections (tune half, first turns)")
    started = time.perf_counter()
    report = training_data_seed(seeded_questions, docs_root=root, collection=args.collection)
    seed_s = time.perf_counter() - started
    keys = {f"{args.collection}:{q.qid}": q.qid for q in seeded_questions}
    curated_qids = {keys[c.seed_key] for c in Correction.objects.filter(seed_key__in=keys, curated_answer__isnull=False)}
    print(f"\nseeded {report.created} new ({report.curated} curated now), {report.existing} already seeded, "
          f"{len(report.skipped)} skipped, in {seed_s:.1f} s; curated answers of these questions: {len(curated_qids)}")
    corrected_dialogues = {dialogue_of(by_qid[qid]) for qid in curated_qids}

    groups: dict[str, list[tuple[str, tuple, GoldQuestion | None, str]]] = {
        "corrected question asked again": [(by_qid[q].question, (), by_qid[q], by_qid[q].reference_answer)
                                           for q in sorted(curated_qids)],
        "paraphrase of a corrected question": [(p["paraphrase"], (), by_qid[p["qid"]], by_qid[p["qid"]].reference_answer)
                                               for p in paraphrases if p["qid"] in curated_qids],
        "later turn of a corrected dialogue": [(q.question, q.history, q, q.reference_answer) for q in questions
                                               if not q.is_first_turn and dialogue_of(q) in corrected_dialogues],
        "first turn of a held-out dialogue": [(q.question, (), q, q.reference_answer) for q in questions
                                              if q.is_first_turn and q.split == "heldout"],
        "unrelated question": [(text, (), None, "") for text in unrelated],
    }
    results: dict[str, list[dict]] = {}
    for name, items in groups.items():
        progress(f"{name}: {len(items)} questions")
        reach = 2.0 if name == "unrelated question" else limit  # how close the closest unrelated one comes
        results[name] = [{**ask(text, history, args.collection, reach, gold, root, args.any_turn), "reference": reference,
                          "question": text, "history": history, "gold": gold}
                         for text, history, gold, reference in items]

    print("\n| group | threshold | asked | served | share | token-F1 of served | evidence on gold (served) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        for t in thresholds:
            served = [r for r in rows if r["distance"] is not None and r["distance"] <= t]
            f1 = statistics.fmean(token_f1(r["text"], r["reference"]) for r in served) if served and name != "unrelated question" else None
            on_gold = sum(r["on_gold"] for r in served)
            mark = "**" if abs(t - settings.CURATED_MATCH_MAX_DISTANCE) < 1e-9 else ""
            print(f"| {name} | {mark}{t:.2f}{mark} | {len(rows)} | {len(served)} | {len(served) / max(1, len(rows)):.3f} | "
                  f"{'' if f1 is None else f'{f1:.3f}'} | {'' if name == 'unrelated question' else f'{on_gold} ({on_gold / max(1, len(served)):.2f})'} |")
    closest = sorted(r["distance"] for r in results["unrelated question"] if r["distance"] is not None)
    print(f"\nunrelated questions within {limit:.2f} of a curated question: {sum(d <= limit for d in closest)}; "
          f"closest distances: {', '.join(f'{d:.3f}' for d in closest[:3])}")
    lookup_ms = [r["ms"] for rows in results.values() for r in rows if r["looked_up"]]
    print(f"curated lookup (embedding + pgvector query) p50 / p95: {percentile(lookup_ms, 50):.1f} / "
          f"{percentile(lookup_ms, 95):.1f} ms over {len(lookup_ms)} questions")

    if args.baseline_upto:
        # The pipeline without curated answers on every question served up to --baseline-upto, compared
        # band by band: a wider threshold is worth it while the answers it adds beat what the customer got.
        bands = [t for t in thresholds if t <= args.baseline_upto + 1e-9]
        print(f"\nper band of distance, questions served there and answered by the pipeline without curated answers "
              f"too (answer_compose(curated=False): retrieval, quote or the model, the check; token-F1, declined = 0):")
        print("| group | distance band | questions | curated answer F1 | pipeline without F1 | without: generated / quoted / declined |")
        print("|---|---|---:|---:|---:|---|")
        for name in ("first turn of a held-out dialogue", "later turn of a corrected dialogue"):
            rows = [r for r in results[name] if r["distance"] is not None and r["distance"] <= bands[-1]]
            progress(f"baseline, {name}: {len(rows)} questions through the pipeline without curated answers")
            for done, r in enumerate(rows, start=1):
                if done % 10 == 0:
                    progress(f"  {done} of {len(rows)}")
                composed = None
                for event in answer_compose(r["question"], history=list(r["history"]), collection=args.collection,
                                            curated=False):
                    if event.type == "answer.composed":
                        composed = event.data["answer"]
                r["without_f1"] = token_f1(composed.text, r["reference"]) if composed and not composed.abstained else 0.0
                r["without_method"] = composed.method if composed else "error"
            low = -1.0
            for t in bands:
                band = [r for r in rows if low < r["distance"] <= t]
                if band:
                    methods = " / ".join(str(sum(r["without_method"] == m for r in band))
                                         for m in ("generated", "extractive", "declined"))
                    print(f"| {name} | ({max(low, 0):.2f}, {t:.2f}] | {len(band)} | "
                          f"{statistics.fmean(token_f1(r['text'], r['reference']) for r in band):.3f} | "
                          f"{statistics.fmean(r['without_f1'] for r in band):.3f} | {methods} |", flush=True)
                low = t

if __name__ == "__main__":
    main()
