"""``manage.py evaluate_model --candidate VERSION [--dataset N] [--limit N] [--report FILE]``: the
four-arm evaluation (base + retrieval, candidate without retrieval, candidate + retrieval, active +
retrieval) on a dataset's held-out split through the serving path (``tuning.evaluation``), the gate's
decision, and the HTML report."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from chat.models import ModelVersion
from tuning.evaluation import ARMS, heldout_questions
from tuning.models import TrainingDataset
from tuning.reports import METRICS


def version_lookup(value: str) -> ModelVersion:
    """A model version by id or name; raises ``CommandError`` when there is none."""
    found = ModelVersion.objects.filter(pk=int(value)).first() if value.isdigit() else None
    found = found or ModelVersion.objects.filter(name=value).first()
    if found is None:
        raise CommandError(f"no model version {value!r} (see manage.py rollback_model --list)")
    return found


class Command(BaseCommand):
    help = "Evaluate a model version against the base and the active model on held-out corrections."

    def add_arguments(self, parser):
        parser.add_argument("--candidate", required=True, help="model version id or name")
        parser.add_argument("--dataset", type=int, help="dataset snapshot version (default: the latest)")
        parser.add_argument("--limit", type=int, help="at most N held-out questions (default TUNING_EVAL_MAX_QUESTIONS)")
        parser.add_argument("--report", help="write the HTML report to this file")

    def handle(self, *args, candidate, dataset, limit, report, **options):
        from tuning.evaluation import evaluation_run

        version = version_lookup(candidate)
        snapshot = (TrainingDataset.objects.filter(version=dataset).first() if dataset
                    else TrainingDataset.objects.order_by("-version").first())
        if snapshot is None:
            raise CommandError("no dataset snapshot (run manage.py fine_tune, or seed_training_data first)")
        questions = heldout_questions(snapshot, limit=limit)
        if not questions:
            raise CommandError(f"dataset v{snapshot.version} has no held-out examples")
        evaluation = evaluation_run(snapshot, version, questions=questions)
        self.stdout.write(f"evaluation {evaluation.pk} on dataset v{snapshot.version}, {len(questions)} held-out questions\n")
        self.stdout.write("| metric | " + " | ".join(ARMS) + " |")
        self.stdout.write("|---|" + "---:|" * len(ARMS))
        for key, label, _ in METRICS + [("markers", "citation markers written", None), ("duration_s", "duration (s)", None)]:
            values = [evaluation.arms[arm].get(key) for arm in ARMS]
            self.stdout.write(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:g}" for v in values) + " |")
        decision = evaluation.decision
        self.stdout.write(f"\ngate: {'promote' if decision['promote'] else 'do not promote'}: {decision['reason']}")
        if report:
            with open(report, "w", encoding="utf-8") as handle:
                handle.write(evaluation.report_html)
            self.stdout.write(f"report written to {report}")
