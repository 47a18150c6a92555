"""Admin for the tuning loop: dataset snapshots and evaluations are read-only (immutable records);
runs can be inspected, and cancelled by marking them failed (the worker stops at its next step)."""

from django.contrib import admin
from django.utils import timezone

from tuning.models import Correction, FineTuneRun, ModelEvaluation, TrainingDataset


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
