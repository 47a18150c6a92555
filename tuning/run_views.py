"""Dashboard pages for the tuning loop (under ``/dashboard/fine-tunes/``): runs with live progress,
their evaluation reports, the "fine-tune now" button and model versions with one-click rollback; and
the embedder runs and embedding-model versions with their live progress (promoted and rolled back from
the admin, in a worker).

Agents see everything; starting a run and changing the served version are for staff (admins)."""

from __future__ import annotations

from django.contrib import messages as flash
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from chat.access import agent_required
from chat.engine import EngineError
from chat.models import ModelVersion
from tuning.datasets import new_approved_since
from tuning.fine_tuning import FineTuneError, fine_tune_run_start, model_version_rollback
from knowledge.models import EmbeddingModelVersion
from tuning.models import EmbedderRun, FineTuneRun, ModelEvaluation, TrainingDataset

# Embedding versions whose work is under way (the page refreshes itself while one is).
_VERSIONS_BUSY = (EmbeddingModelVersion.Status.BUILDING, EmbeddingModelVersion.Status.PROMOTING)


def _staff_only(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise PermissionDenied("only admins can start fine-tunes or change the served model")


@agent_required
def run_list(request: HttpRequest) -> HttpResponse:
    """Runs (newest first) with status, progress and decision; model versions; the start button; and
    the retriever's side: embedder runs (training, re-embedding, gate, promotion progress) and
    embedding-model versions (building / promoting progress, the serving one, fitted abstention
    thresholds). The page reloads itself every few seconds while any of them is in progress."""
    runs = list(FineTuneRun.objects.select_related("dataset", "model_version")[:50])
    latest = TrainingDataset.objects.order_by("-version").first()
    embedder_runs = list(EmbedderRun.objects.select_related("embedding_version").defer(
        "train_examples", "heldout_examples", "unanswerable_questions", "evaluation", "loss_curve")[:20])
    embedding_versions = list(EmbeddingModelVersion.objects.all()[:20])
    return render(request, "dashboard/fine_tunes.html", {
        "runs": runs, "versions": ModelVersion.objects.order_by("-created_at", "-id")[:50],
        "in_progress": any(r.status in FineTuneRun.IN_PROGRESS for r in runs),
        "embedder_runs": embedder_runs, "embedding_versions": embedding_versions,
        "embedder_busy": (any(r.status in EmbedderRun.IN_PROGRESS for r in embedder_runs)
                          or any(v.status in _VERSIONS_BUSY for v in embedding_versions)),
        "new_corrections": new_approved_since(latest), "latest_dataset": latest,
    })


@agent_required
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    """One run: progress, loss curve, parity, decision and its evaluation report (embedded)."""
    run = FineTuneRun.objects.select_related("dataset", "model_version").filter(pk=run_id).first()
    if run is None:
        raise Http404("no such run")
    evaluation = run.evaluations.filter(status=ModelEvaluation.Status.SUCCEEDED).first()
    return render(request, "dashboard/fine_tune_detail.html", {
        "run": run, "evaluation": evaluation, "in_progress": run.status in FineTuneRun.IN_PROGRESS,
    })


@agent_required
def evaluation_report(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    """The stored HTML report of an evaluation, served with a sandboxing CSP (no scripts)."""
    evaluation = ModelEvaluation.objects.filter(pk=evaluation_id).first()
    if evaluation is None or not evaluation.report_html:
        raise Http404("no report")
    response = HttpResponse(evaluation.report_html)
    response["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
    response["X-Frame-Options"] = "SAMEORIGIN"
    return response


@agent_required
@require_POST
def run_start(request: HttpRequest) -> HttpResponse:
    """"Fine-tune now" (staff): ``fine_tune_run_start`` on the approved corrections."""
    _staff_only(request)
    try:
        run = fine_tune_run_start(trigger="manual", requested_by=request.user)
    except FineTuneError as error:
        flash.error(request, str(error))
        return redirect("fine_tunes:run_list")
    flash.success(request, f"Fine-tune run {run.pk} queued on dataset v{run.dataset.version}.")
    return redirect("fine_tunes:run_detail", run_id=run.pk)


@agent_required
@require_POST
def version_activate(request: HttpRequest, version_id: int) -> HttpResponse:
    """Promote or roll back (staff): serve model version ``version_id`` from the next answer on."""
    _staff_only(request)
    try:
        version = model_version_rollback(version_id)
    except ModelVersion.DoesNotExist:
        raise Http404("no such model version") from None
    except (FileNotFoundError, EngineError) as error:
        flash.error(request, f"cannot serve it: {error}")
    else:
        flash.success(request, f"Now serving {version.name}.")
    return redirect("fine_tunes:run_list")
