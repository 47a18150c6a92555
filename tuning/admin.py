"""Admin for the tuning loop: dataset snapshots and evaluations are read-only (immutable records);
runs can be inspected, and cancelled by marking them failed (the worker stops at its next step)."""

from django.contrib import admin, messages
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from tuning.models import Correction, EmbedderRun, FineTuneRun, ModelEvaluation, TrainingDataset


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(TrainingDataset)
class TrainingDatasetAdmin(ReadOnlyAdmin):
    list_display = ("version", "train_count", "heldout_count", "corrections_count", "created_at", "sha256")
    readonly_fields = ("version", "recipe", "sha256", "train_count", "heldout_count", "corrections_count", "created_at")


@admin.register(ModelEvaluation)
class ModelEvaluationAdmin(ReadOnlyAdmin):
    list_display = ("pk", "run", "dataset", "status", "created_at")
    exclude = ("rows", "report_html")


@admin.register(FineTuneRun)
class FineTuneRunAdmin(admin.ModelAdmin):
    list_display = ("pk", "status", "trigger", "dataset", "progress", "model_version", "created_at", "duration_s")
    list_filter = ("status", "trigger")
    readonly_fields = [f.name for f in FineTuneRun._meta.fields]
    actions = ["cancel"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Cancel the selected runs in progress (the active model is untouched)")
    def cancel(self, request, queryset):
        count = queryset.filter(status__in=FineTuneRun.IN_PROGRESS).update(
            status=FineTuneRun.Status.FAILED, error=f"cancelled by {request.user.get_username()}",
            finished_at=timezone.now())
        self.message_user(request, f"cancelled {count} run(s)")


@admin.register(Correction)
class CorrectionAdmin(ReadOnlyAdmin):
    list_display = ("pk", "status", "reason", "seeded", "stale", "author", "created_at")
    list_filter = ("status", "reason", "seeded", "stale")
    exclude = ("shown_chunks", "supporting_chunks", "history")


def _declined(counts: dict | None) -> str:
    """``"declined / n"`` of an abstention count (``tuning.embedder_evaluation._declined``)."""
    return f"{counts['declined']} / {counts['n']}" if counts else "–"


@admin.register(EmbedderRun)
class EmbedderRunAdmin(admin.ModelAdmin):
    """Embedder runs (read-only), with "Retrain retriever now" (starts a run on the tuning queue) and
    a cancel action (the worker stops at its next step; serving is untouched either way). The list and
    a run's page refresh themselves while a run is in progress (training, re-embedding, gate, promotion)."""

    list_display = ("pk", "status", "trigger", "train_count", "heldout_count", "progress", "reembedding_progress",
                    "dimension", "promoted", "created_at", "duration_s")
    list_filter = ("status", "trigger", "promoted")
    readonly_fields = ["gate", *[f.name for f in EmbedderRun._meta.fields]]
    exclude = ("train_examples", "heldout_examples", "unanswerable_questions")

    @admin.display(description="promotion gate")
    def gate(self, run):
        """The gate's decision and its numbers (active vs candidate through ``chunk_search``)."""
        decision = run.decision or {}
        if not decision:
            return "not decided yet"
        served, candidate = decision.get("served", {}), decision.get("candidate", {})
        interval = decision.get("mrr_gain_interval") or {}
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((name, served.get(key), candidate.get(key)) for name, key in (
                ("passage-hit@1", "passage_hit@1"), ("passage-hit@5", "passage_hit@5"),
                ("passage-hit@10", "passage_hit@10"), ("document-hit@5", "document_hit@5"), ("MRR@10", "mrr"),
                ("questions", "n"))))
        abstention = decision.get("abstention") or {}
        if abstention:
            answerable, unanswerable = abstention.get("answerable", {}), abstention.get("unanswerable", {})
            rows += format_html_join(
                "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                ((name, served, candidate) for name, served, candidate in (
                    ("abstention threshold (cosine distance)", abstention.get("served_threshold"),
                     f"{abstention.get('candidate_threshold')} ({abstention.get('method')})"),
                    ("answerable questions declined", _declined(answerable.get("served")),
                     _declined(answerable.get("candidate"))),
                    ("unanswerable questions declined", _declined(unanswerable.get("served")),
                     _declined(unanswerable.get("candidate"))),
                    ("own-words margin (cosine distance)", abstention.get("served_own_margin"),
                     abstention.get("candidate_own_margin")))))
        curated = decision.get("curated_match") or {}
        if curated:
            rows += format_html(
                "<tr><td>{}</td><td>{}</td><td>{} ({})</td></tr>", "curated-answer match threshold (cosine distance)",
                curated.get("served_threshold"), curated.get("candidate_threshold"), curated.get("method"))
        return format_html(
            "<p><strong>{}</strong>: {}</p><p>MRR gain {} (interval [{}, {}]){}</p>"
            "<table><tr><th>metric</th><th>active</th><th>candidate</th></tr>{}</table>",
            "promote" if decision.get("promote") else "keep the active embedder", decision.get("reason", ""),
            decision.get("mrr_gain"), interval.get("low"), interval.get("high"),
            "; promoted" if run.promoted else "", rows)

    def changelist_view(self, request, extra_context=None):
        busy = EmbedderRun.objects.filter(status__in=EmbedderRun.IN_PROGRESS).exists()
        return super().changelist_view(request, {**(extra_context or {}), "embedder_busy": busy})

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        run = EmbedderRun.objects.filter(pk=object_id).only("status").first() if str(object_id).isdigit() else None
        busy = run is not None and run.status in EmbedderRun.IN_PROGRESS
        return super().changeform_view(request, object_id, form_url, {**(extra_context or {}), "embedder_busy": busy})
    actions = ["cancel"]
    change_list_template = "admin/tuning/embedderrun/change_list.html"

    def has_add_permission(self, request):
        return False

    def get_urls(self):
        return [path("retrain/", self.admin_site.admin_view(self.retrain_view), name="tuning_embedderrun_retrain"),
                *super().get_urls()]

    def retrain_view(self, request):
        """POST: ``tuning.embedder_runs.embedder_run_start`` for the requesting admin; the reason in
        a message when it cannot start."""
        from tuning.embedder_runs import EmbedderRunError, embedder_run_start

        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not request.user.has_perm("tuning.add_embedderrun") and not request.user.is_superuser:
            self.message_user(request, "only admins may start an embedder run", messages.ERROR)
        else:
            try:
                run = embedder_run_start(trigger="manual", requested_by=request.user)
            except EmbedderRunError as error:
                self.message_user(request, f"embedder run not started: {error}", messages.ERROR)
            else:
                self.message_user(request, f"embedder run {run.pk} queued ({run.train_count} training / "
                                           f"{run.heldout_count} held-out examples)")
        return HttpResponseRedirect(reverse("admin:tuning_embedderrun_changelist"))

    @admin.action(description="Cancel the selected runs in progress (serving is untouched)")
    def cancel(self, request, queryset):
        count = queryset.filter(status__in=EmbedderRun.IN_PROGRESS).update(
            status=EmbedderRun.Status.FAILED, error=f"cancelled by {request.user.get_username()}",
            finished_at=timezone.now())
        self.message_user(request, f"cancelled {count} run(s)")
