"""RAG vs fine-tune vs both on Doc2Dial: a LoRA fine-tune of the served GGUF on seeded examples, then
the four-arm evaluation on held-out dialogues, with training time and peak memory.

Steps (the product's own code path, ``tuning.fine_tuning``):

1. ``seed_training_data`` on the dev questions of dialogues ``--dialogues I:J`` (reference answers and
   gold passages from Doc2Dial) plus ``benchmarks/data/unrelated_questions.txt`` as unanswerable
   questions (seeded with the abstention answer);
2. a dataset snapshot with the RAFT recipe; the held-out split keeps whole dialogues out of training
   (``TUNING_HOLDOUT_SHARE`` of the dialogues, by hash), so evaluation questions come from dialogues
   the model never saw;
3. a fine-tune run in this process (``fine_tune_run_execute``): LoRA training, GGUF adapter export,
   parity check, evaluation of the four arms through the serving path, gate decision (this script
   never promotes: it restores the previously active version afterwards).

The baseline is the ``base+retrieval`` arm (the product without fine-tuning), measured in the same
run on the same questions; the table prints each arm's figures and its token-F1 ratio to the baseline.
Peak memory is the process's maximum RSS (``ru_maxrss``), which includes the embedding model.

    DATABASE_NAME=tuningbench python manage.py ingest ../shared/data/doc2dial/docs --collection doc2dial --sync
    DATABASE_NAME=tuningbench python benchmarks/tuning_arms.py --dialogues 0:40 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import django_setup, header  # noqa: E402

DEFAULT_QUESTIONS = "../shared/data/doc2dial/questions_dev.jsonl"
UNRELATED = Path(__file__).resolve().parent / "data" / "unrelated_questions.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--dialogues", default="0:40", help="dialogues I:J of the file to seed")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--eval-questions", type=int, default=60, help="held-out questions per arm")
    parser.add_argument("--unanswerable", type=int, default=25, help="unrelated questions seeded (from the file)")
    parser.add_argument("--gold-share", type=float, default=None, help="RAFT gold share (default TUNING_GOLD_SHARE)")
    parser.add_argument("--report-run", type=int, help="only print the tables of an earlier run of this script")
    args = parser.parse_args()

    django_setup()
    import tempfile

    from django.conf import settings
    from django.core.management import call_command

    from chat.models import ModelVersion
    from chat.services import model_version_activate, model_version_active
    from knowledge.models import Source
    from tuning.evaluation import ARMS
    from tuning.fine_tuning import fine_tune_run_execute, fine_tune_run_start
    from tuning.models import FineTuneRun, ModelEvaluation
    from tuning.seeding import question_lines

    if args.report_run:
        report(FineTuneRun.objects.get(pk=args.report_run))
        return
    print(header("tuning_arms: base+retrieval vs candidate (with and without retrieval) vs active",
                 [("arguments", str(vars(args))), ("generation model", settings.LLM_MODEL_PATH)]))
    if not Source.objects.filter(collection=args.collection, status="ready").exists():
        sys.exit(f"collection {args.collection!r} is empty: ingest ../shared/data/doc2dial/docs first (see the docstring)")
    settings.TUNING_EVAL_MAX_QUESTIONS = args.eval_questions
    if args.gold_share is not None:
        settings.TUNING_GOLD_SHARE = args.gold_share
    unrelated = question_lines(UNRELATED.read_text())[: args.unanswerable]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(unrelated) + "\n")
    call_command("seed_training_data", questions=args.questions, collection=args.collection,
                 dialogues=args.dialogues, unanswerable=handle.name)

    active = model_version_active()
    overrides = {"epochs": args.epochs} if args.epochs else {}
    run = fine_tune_run_start(trigger="command", hyperparameters=overrides, enqueue=False)
    print(f"dataset v{run.dataset.version}: {run.dataset.train_count} training / {run.dataset.heldout_count} "
          f"held-out examples; hyper-parameters {run.hyperparameters}", flush=True)
    run = fine_tune_run_execute(run.pk)
    if ModelVersion.objects.get(is_active=True) != active:
        model_version_activate(active)  # a benchmark never changes what is served
        FineTuneRun.objects.filter(pk=run.pk).update(status=FineTuneRun.Status.SUCCEEDED)
    if run.status == FineTuneRun.Status.FAILED:
        sys.exit(f"run {run.pk} failed: {run.error}")
    report(run)


def report(run) -> None:
    """Print the training figures and the four-arm table of a finished run."""
    from tuning.evaluation import ARMS
    from tuning.models import ModelEvaluation

    print(f"run {run.pk}, dataset v{run.dataset.version} (recipe {run.dataset.recipe}), "
          f"hyper-parameters {run.hyperparameters}")
    evaluation = ModelEvaluation.objects.get(pk=run.decision["evaluation_id"])
    arms = evaluation.arms
    losses = [p["loss"] for p in run.loss_curve]
    print(f"\ntraining: {run.train_examples} examples, {len(losses)} steps, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} (first/last step), run {run.duration_s:.0f} s in all, peak RSS {run.peak_rss_mb:.0f} MB")
    print(f"parity: {run.parity.get('passed')} (base runtimes top-1 {run.parity['base']['top1_agreement']:.3f}, "
          f"adapter top-1 {run.parity['adapter']['top1_agreement']:.3f}, adapter KL {run.parity['adapter']['mean_kl_nats']:.4f} "
          f"vs base KL {run.parity['base']['mean_kl_nats']:.4f})")
    base_f1 = arms["base+retrieval"]["token_f1"] or 0.0
    keys = [("token_f1", "token-F1 (answerable, declined = 0)"), ("citation_validity", "citation validity"),
            ("cited_answers", "answers with a valid citation"), ("citation_precision", "citation precision"),
            ("abstention_accuracy", "abstention accuracy (unanswerable)"), ("false_abstention", "declined answerable"),
            ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p95_ms", "TTFT p95 (ms)"), ("tokens_per_s_p50", "tokens/s p50"),
            ("duration_s", "arm wall time (s)")]
    first = arms[ARMS[0]]
    print(f"\nheld-out questions: {first['questions']} ({first['answerable']} answerable, {first['unanswerable']} unanswerable)\n")
    print("| metric | " + " | ".join(ARMS) + " |")
    print("|---|" + "---:|" * len(ARMS))
    for key, label in keys:
        print(f"| {label} | " + " | ".join("n/a" if arms[a].get(key) is None else f"{arms[a][key]:g}" for a in ARMS) + " |")
    print("| token-F1 ratio to base+retrieval | " + " | ".join(
        f"{(arms[a]['token_f1'] or 0) / base_f1:.2f}" if base_f1 else "n/a" for a in ARMS) + " |")
    print(f"\ngate: {'promote' if run.decision['promote'] else 'keep'}: {run.decision['reason']}")


if __name__ == "__main__":
    main()
