"""RAG vs fine-tune vs both, by the amount of data: LoRA fine-tunes on 100, 300, 1,000 and all seeded
Doc2Dial corrections, each evaluated on the same held-out dialogues beside the base model with
retrieval and an extractive answer (no model) computed in the same run.

Steps (the product's own code path):

1. ``seed_training_data`` on ``--questions`` (default: all 2,022 Doc2Dial dev questions, every turn,
   with the retrieval context they really had), minus the dialogues of ``--unseen-domain`` (kept out
   of training entirely), plus ``--unanswerable`` out-of-scope questions seeded with the abstention
   answer;
2. per size N: a dataset snapshot whose recipe keeps the first N training examples
   (``RaftRecipe.max_train_examples``; the held-out split, by dialogue hash, is the same for every
   size), then a fine-tune run in this process (``tuning.fine_tuning.fine_tune_run_execute``:
   training, GGUF adapter export, parity check, the four-arm evaluation through the serving path and
   the gate's decision; this script never changes the served model: the previously active version
   is restored);
3. the extractive baseline (``tuning.evaluation.extractive_rows``) once, on the same held-out
   questions;
4. with ``--unseen-domain``, each candidate and the base model answer ``--unseen-questions``
   questions of that domain (first turns), which no run trained on: the "no regression on a
   knowledge base it never saw" check.

Prints one table: per size and arm, token-F1 (answerable; declined = 0) and its ratio to base +
retrieval, citation precision, abstention accuracy on unanswerable questions, answerable questions
declined; per run, training time and peak RSS (``ru_maxrss`` of this process, which includes the
embedding model and every earlier run, so it only grows).

    EMBEDDED_SERVICES=1 DATABASE_NAME=tuningbench .venv/bin/python manage.py ingest \\
        ../shared/data/doc2dial/docs --collection doc2dial --sync
    EMBEDDED_SERVICES=1 DATABASE_NAME=tuningbench .venv/bin/python benchmarks/learning_curve.py --sizes 100,300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import django_setup, header, torch_threads  # noqa: E402

DEFAULT_QUESTIONS = "../shared/data/doc2dial/questions_dev.jsonl"
UNRELATED = Path(__file__).resolve().parent / "data" / "unrelated_questions.txt"
METRICS = (("token_f1", "F1"), ("citation_precision", "cit. prec."), ("citation_validity", "cit. valid"),
           ("abstention_accuracy", "abstain (unans.)"), ("false_abstention", "declined (ans.)"))


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--sizes", default="100,300,1000,all", help="training examples per run, comma-separated")
    parser.add_argument("--epochs", type=int, default=None, help="default TUNING_EPOCHS")
    parser.add_argument("--eval-questions", type=int, default=60, help="held-out questions per arm")
    parser.add_argument("--unanswerable", type=int, default=25, help="out-of-scope questions seeded (from the file)")
    parser.add_argument("--unseen-domain", default="", help="Doc2Dial domain never trained on (e.g. dmv)")
    parser.add_argument("--unseen-questions", type=int, default=30)
    parser.add_argument("--report-runs", default="", help="only report earlier runs of this script (ids, comma-separated): "
                        "the stored evaluations, the extractive baseline and the unseen-domain arms recomputed")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads for training (1 measured 3.5-4x faster than 2 on 2 busy cores)")
    args = parser.parse_args()

    django_setup()
    torch_threads(args.torch_threads)
    from django.conf import settings
    from django.core.management import call_command

    from chat.models import ModelVersion
    from chat.services import model_version_activate, model_version_active
    from knowledge.evaluation import load_questions
    from knowledge.models import Source
    from tuning.datasets import RaftRecipe, dataset_snapshot_create
    from tuning.evaluation import ARMS, arm_metrics, extractive_rows, heldout_questions
    from tuning.fine_tuning import fine_tune_run_execute, fine_tune_run_start
    from tuning.models import FineTuneRun, ModelEvaluation
    from tuning.seeding import question_lines

    print(header("learning_curve: base+retrieval vs candidate (alone, + retrieval) by training-set size, "
                 "beside an extractive answer", [("arguments", str(vars(args))),
                                                 ("generation model", settings.LLM_MODEL_PATH)]), flush=True)
    if not Source.objects.filter(collection=args.collection, status="ready").exists():
        sys.exit(f"collection {args.collection!r} is empty: ingest ../shared/data/doc2dial/docs first (see the docstring)")
    settings.TUNING_EVAL_MAX_QUESTIONS = args.eval_questions
    all_questions = load_questions(Path(args.questions))
    if args.report_runs:
        results, questions = [], None
        for run in FineTuneRun.objects.filter(pk__in=[int(x) for x in args.report_runs.split(",")]).order_by("train_examples"):
            evaluation = ModelEvaluation.objects.get(pk=run.decision["evaluation_id"])
            questions = questions or heldout_questions(run.dataset)
            unseen = unseen_domain_arms(run, all_questions, args) if args.unseen_domain else None
            results.append({"size": run.train_examples, "run": run, "arms": evaluation.arms, "unseen": unseen})
        report(results, arm_metrics(extractive_rows(questions)), ARMS)
        return

    seeded = [q for q in all_questions if domain_of(q) != args.unseen_domain]
    with tempfile.TemporaryDirectory() as folder:
        subset = Path(folder) / "questions.jsonl"
        raw = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
        subset.write_text("".join(json.dumps(r) + "\n" for r in raw if r.get("domain") != args.unseen_domain))
        unrelated = Path(folder) / "unrelated.txt"
        unrelated.write_text("\n".join(question_lines(UNRELATED.read_text())[: args.unanswerable]) + "\n")
        call_command("seed_training_data", questions=str(subset), collection=args.collection,
                     docs_root=str(Path(args.questions).parent), unanswerable=str(unrelated))
    print(f"seeding: {len(seeded)} questions offered (unseen domain {args.unseen_domain or 'none'} left out)", flush=True)

    active = model_version_active()
    results = []
    questions = None
    for size in args.sizes.split(","):
        limit = None if size == "all" else int(size)
        dataset = dataset_snapshot_create(RaftRecipe.from_settings(max_train_examples=limit))
        overrides = {"epochs": args.epochs} if args.epochs else {}
        run = fine_tune_run_start(trigger="command", dataset=dataset, hyperparameters=overrides, enqueue=False)
        print(f"size {size}: dataset v{dataset.version}, {dataset.train_count} training / {dataset.heldout_count} "
              f"held-out examples; hyper-parameters {run.hyperparameters}", flush=True)
        run = fine_tune_run_execute(run.pk)
        if ModelVersion.objects.get(is_active=True) != active:
            model_version_activate(active)  # a benchmark never changes what is served
            FineTuneRun.objects.filter(pk=run.pk).update(status=FineTuneRun.Status.SUCCEEDED)
        if run.status == FineTuneRun.Status.FAILED:
            print(f"size {size}: run {run.pk} failed: {run.error}", flush=True)
            continue
        evaluation = ModelEvaluation.objects.get(pk=run.decision["evaluation_id"])
        questions = questions or heldout_questions(dataset)
        unseen = None
        if args.unseen_domain:
            unseen = unseen_domain_arms(run, all_questions, args)
        results.append({"size": size, "run": run, "arms": evaluation.arms, "unseen": unseen})
        print(f"size {size}: run {run.pk} trained on {run.train_examples} examples, {run.duration_s:.0f} s in all, "
              f"gate: {run.decision.get('reason')}", flush=True)

    if questions is None:
        sys.exit("no run finished")
    started = time.perf_counter()
    extractive = arm_metrics(extractive_rows(questions))
    print(f"extractive baseline: {time.perf_counter() - started:.1f} s", flush=True)
    report(results, extractive, ARMS)


def domain_of(question) -> str:
    """A Doc2Dial question's domain: the folder of its gold page (``docs/<domain>/<page>.txt``)."""
    parts = Path(question.gold_file).parts
    return parts[-2] if len(parts) >= 2 else ""


def unseen_domain_arms(run, all_questions, args) -> dict:
    """Base + retrieval and candidate + retrieval on first-turn questions of the unseen domain."""
    from chat.models import ModelVersion
    from knowledge.models import Chunk
    from tuning.evaluation import HeldOutQuestion, arm_answers, arm_metrics, base_version_for, extractive_rows
    from tuning.seeding import _sources_by_relative_path

    by_path = _sources_by_relative_path(args.collection, Path(args.questions).parent.resolve())
    questions = []
    for q in all_questions:
        if domain_of(q) != args.unseen_domain or q.history or q.gold_file not in by_path:
            continue
        gold = [(by_path[q.gold_file], c.start, c.end) for c in Chunk.objects.filter(
            source_id=by_path[q.gold_file], start__lt=q.answer_end, end__gt=q.answer_start).only("start", "end")]
        if gold:
            questions.append(HeldOutQuestion(example_id=0, question=q.question, history=[], collection=args.collection,
                                             reference=q.reference_answer, gold=gold))
        if len(questions) >= args.unseen_questions:
            break
    candidate = ModelVersion.objects.get(pk=run.model_version_id)
    return {"questions": len(questions),
            "base+retrieval": arm_metrics(arm_answers(base_version_for(candidate), questions, retrieval=True)),
            "candidate+retrieval": arm_metrics(arm_answers(candidate, questions, retrieval=True)),
            "extractive": arm_metrics(extractive_rows(questions))}


def report(results: list[dict], extractive: dict, arms: tuple[str, ...]) -> None:
    """Print the learning-curve table (markdown)."""
    first = results[0]["arms"][arms[0]]
    print(f"\nheld-out questions: {first['questions']} ({first['answerable']} answerable, "
          f"{first['unanswerable']} unanswerable), the same for every size\n")
    print("| training examples | arm | " + " | ".join(label for _, label in METRICS) + " | F1 ratio to base+RAG |")
    print("|---|---|" + "---:|" * (len(METRICS) + 1))
    base_f1 = first.get("token_f1") or 0.0
    ratio = f"{(extractive['token_f1'] or 0) / base_f1:.2f}" if base_f1 else "–"
    print("| – | extractive (no model) | " + " | ".join(_fmt(extractive.get(k)) for k, _ in METRICS) + f" | {ratio} |")
    for result in results:
        run = result["run"]
        for arm in ("base+retrieval", "candidate", "candidate+retrieval"):
            metrics = result["arms"][arm]
            ratio = f"{(metrics['token_f1'] or 0) / base_f1:.2f}" if base_f1 else "–"
            print(f"| {run.train_examples} | {arm} | " + " | ".join(_fmt(metrics.get(k)) for k, _ in METRICS)
                  + f" | {ratio} |")
    print("\n| training examples | training + export + parity + evaluation (s) | peak RSS (MB) | loss first → last | gate |")
    print("|---:|---:|---:|---|---|")
    for result in results:
        run = result["run"]
        losses = [p["loss"] for p in run.loss_curve]
        print(f"| {run.train_examples} | {run.duration_s:.0f} | {run.peak_rss_mb:.0f} | "
              f"{losses[0]:.3f} → {losses[-1]:.3f} | {'promote' if run.decision.get('promote') else 'keep'} |")
    unseen = [r for r in results if r["unseen"]]
    if unseen:
        print(f"\nunseen domain ({unseen[0]['unseen']['questions']} first-turn questions, never trained on):\n")
        print("| training examples | arm | " + " | ".join(label for _, label in METRICS) + " |")
        print("|---|---|" + "---:|" * len(METRICS))
        for result in unseen:
            for arm in ("extractive", "base+retrieval", "candidate+retrieval"):
                print(f"| {result['run'].train_examples} | {arm} | "
                      + " | ".join(_fmt(result["unseen"][arm].get(k)) for k, _ in METRICS) + " |")


if __name__ == "__main__":
    main()
