"""``manage.py fine_tune [--sync] [--epochs N] [--lora-r R] [--learning-rate LR]``: snapshot the
approved corrections and run a LoRA fine-tune (``tuning.fine_tuning``): queued for a Celery worker,
or run here with ``--sync``, printing the outcome."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tuning.fine_tuning import FineTuneError, fine_tune_run_execute, fine_tune_run_start


class Command(BaseCommand):
    help = "Fine-tune the model on approved corrections (snapshot, train, export, parity, evaluate, gate)."

    def add_arguments(self, parser):
        parser.add_argument("--sync", action="store_true", help="run in this process instead of a Celery worker")
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--lora-r", type=int)
        parser.add_argument("--learning-rate", type=float)

    def handle(self, *args, sync, epochs, lora_r, learning_rate, **options):
        overrides = {k: v for k, v in {"epochs": epochs, "r": lora_r, "learning_rate": learning_rate}.items() if v is not None}
        try:
            run = fine_tune_run_start(trigger="command", hyperparameters=overrides, enqueue=not sync)
        except (FineTuneError, ValueError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"run {run.pk}: dataset v{run.dataset.version} ({run.dataset.train_count} training / "
                          f"{run.dataset.heldout_count} held-out examples)")
        if not sync:
            self.stdout.write("queued for a Celery worker; follow it in the dashboard (Fine-tunes)")
            return
        run = fine_tune_run_execute(run.pk)
        self.stdout.write(f"run {run.pk}: {run.status}" + (f" ({run.error})" if run.error else ""))
        if run.decision:
            self.stdout.write(f"decision: {'promote' if run.decision['promote'] else 'keep the active model'}: "
                              f"{run.decision['reason']}")
        if run.status == run.Status.FAILED:
            raise CommandError(run.error)
