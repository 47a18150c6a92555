"""``manage.py fine_tune_embedder [--sync] [--epochs N] [--batch-size B] [--learning-rate LR]
[--max-examples N]``: snapshot the approved corrections' retrieval examples and fine-tune the
embedding model on them (``tuning.embedder_runs``): queued for a Celery worker on the tuning queue,
or run here with ``--sync``, printing the candidate's comparison with the served embedder. The
served embedder is never changed."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tuning.embedder_runs import EmbedderRunError, embedder_run_execute, embedder_run_start

METRICS = ("passage_hit@1", "passage_hit@5", "passage_hit@10", "document_hit@5", "mrr")


class Command(BaseCommand):
    help = "Fine-tune the embedding model on approved corrections and compare it with the served one."

    def add_arguments(self, parser):
        parser.add_argument("--sync", action="store_true", help="run in this process instead of a Celery worker")
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--learning-rate", type=float)
        parser.add_argument("--max-examples", type=int, help="training examples (a seeded sample; 0 = all)")

    def handle(self, *args, sync, epochs, batch_size, learning_rate, max_examples, **options):
        overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size,
                                       "learning_rate": learning_rate}.items() if v is not None}
        try:
            run = embedder_run_start(trigger="command", hyperparameters=overrides, max_examples=max_examples,
                                     enqueue=not sync)
        except (EmbedderRunError, ValueError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"embedder run {run.pk}: {run.train_count} training / {run.heldout_count} held-out examples "
                          f"from {run.corrections_count} corrections")
        if not sync:
            self.stdout.write("queued for a Celery worker on the tuning queue; follow it in the admin (Embedder runs)")
            return
        run = embedder_run_execute(run.pk)
        self.stdout.write(f"embedder run {run.pk}: {run.status}" + (f" ({run.error})" if run.error else ""))
        if run.status == run.Status.FAILED:
            raise CommandError(run.error)
        served, candidate = run.evaluation["served"], run.evaluation["candidate"]
        self.stdout.write(f"held-out corrections: {served['n']}; candidate model: {run.model_path}")
        for metric in METRICS:
            self.stdout.write(f"  {metric:15s} served {served[metric]:.3f}  candidate {candidate[metric]:.3f}")
