"""Fine-tune runs: start, execute (train → export → parity → evaluate → gate → promote), and
promotion / rollback of model versions.

``fine_tune_run_start`` snapshots the approved corrections (``tuning.datasets``) and queues a run
(one in progress at a time, a database constraint); the Celery task ``tuning.fine_tune_run`` calls
``fine_tune_run_execute`` in a worker, which:

1. claims the run (a conditional update from ``queued``: a second delivery of the task does nothing);
2. trains a LoRA adapter on the snapshot's training split with transformers + peft on the base
   GGUF's dequantised weights (``tuning.training``), recording the loss curve and progress;
3. exports it as a GGUF LoRA adapter (``tuning.gguf_lora``) and checks parity between
   llama-cpp-python (base + adapter GGUF) and transformers + peft on a few training prompts
   (``tuning.parity``); a mismatch fails the run;
4. publishes the adapter to the artifact storage (``STORAGES["artifacts"]``: every host that serves or
   evaluates the version copies it from there into its own ``MODEL_CACHE_DIR``; ``TUNING_DIR`` is
   this worker's scratch folder), registers the candidate model version (inactive) with that
   reference and the adapter's SHA-256, and evaluates it against the base and the active version on
   the held-out split through the serving path (``tuning.evaluation``);
5. promotes it (``chat.services.model_version_activate``) only when the gate says so; otherwise the
   run succeeds without promotion and records the reason.

Every status write of the worker is a compare-and-set on the status it last wrote (``_RunReporter``,
``run_finish``): once the stale-run check has marked a run failed, its worker's next write finds
another status, and the worker stops (``RunLost``) without writing ``succeeded`` or promoting.

Any error marks the run ``failed`` with the reason; the active version only changes in step 5, so a
failed, killed or stopped run leaves it serving. A run whose worker stopped reporting for
``TUNING_RUN_STALE_S`` seconds is marked failed by the next start or scheduled check.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from chat.models import ModelVersion
from config.task_queue import task_enqueue_on_commit, unsent_reason
from chat.services import (
    file_sha256,
    model_version_activate,
    model_version_register,
    model_version_server_check,
    model_version_verify,
)
from tuning.datasets import DatasetError, dataset_records, dataset_snapshot_create, new_approved_since
from tuning.models import FineTuneRun, TrainingDataset

logger = logging.getLogger(__name__)

PARITY_PROMPTS = 3
_SAVE_EVERY_S = 2.0


class FineTuneError(Exception):
    """A run cannot start (another is in progress, no data, no base model); nothing was queued."""


def lora_hyperparameters_from_settings(**overrides):
    """``tuning.training.LoraHyperparameters`` from the ``TUNING_*`` settings, with ``overrides``."""
    from tuning.training import LoraHyperparameters

    values = {
        "r": settings.TUNING_LORA_R, "alpha": settings.TUNING_LORA_ALPHA, "dropout": settings.TUNING_LORA_DROPOUT,
        "learning_rate": settings.TUNING_LEARNING_RATE, "epochs": settings.TUNING_EPOCHS,
        "batch_size": settings.TUNING_BATCH_SIZE, "max_seq_tokens": settings.TUNING_MAX_SEQ_TOKENS,
        "seed": settings.TUNING_SEED,
    }
    values.update(overrides)
    return LoraHyperparameters(**values)


def runs_fail_stale(now=None) -> int:
    """Mark failed every in-progress run whose worker has not reported (``heartbeat_at``, or
    ``created_at`` while queued) for ``TUNING_RUN_STALE_S`` seconds. Returns how many.

    The worker of a run failed here learns it at its next write (``_RunReporter.update`` compares and
    sets the status) and stops without writing ``succeeded`` or promoting."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.TUNING_RUN_STALE_S)
    stale = FineTuneRun.objects.filter(status__in=FineTuneRun.IN_PROGRESS)
    count = 0
    for run in stale:
        last = run.heartbeat_at or run.created_at
        if last < cutoff:
            # Compare-and-set on status and heartbeat: a worker that reported or moved on since the
            # read above keeps its run.
            count += FineTuneRun.objects.filter(pk=run.pk, status=run.status, heartbeat_at=run.heartbeat_at).update(
                status=FineTuneRun.Status.FAILED, finished_at=now,
                error=f"the worker stopped reporting during {run.status} (no heartbeat since {last:%Y-%m-%d %H:%M:%S})",
            )
    return count


def fine_tune_run_start(*, trigger: str = "manual", requested_by=None, dataset: TrainingDataset | None = None,
                        base_model_path: str | None = None, hyperparameters: dict | None = None,
                        enqueue: bool = True) -> FineTuneRun:
    """Snapshot the approved corrections (unless ``dataset`` is given) and queue a run on the base
    GGUF ``base_model_path`` (default: the active version's base). ``enqueue`` sends the Celery task
    after commit.

    Raises ``FineTuneError`` (nothing stored) when a run is in progress, there is no usable training
    data, or the base model file is missing.
    """
    from chat.services import model_version_active

    runs_fail_stale()
    if FineTuneRun.objects.filter(status__in=FineTuneRun.IN_PROGRESS).exists():
        raise FineTuneError("a fine-tune run is already in progress")
    base = base_model_path or model_version_active().base_model_path
    if not Path(base).is_file():
        raise FineTuneError(f"base model not found: {base}")
    hp = lora_hyperparameters_from_settings(**(hyperparameters or {}))
    try:
        with transaction.atomic():
            dataset = dataset or dataset_snapshot_create()
            run = FineTuneRun.objects.create(
                dataset=dataset, trigger=trigger, requested_by=requested_by, base_model_path=str(base),
                base_model_sha256=file_sha256(base), hyperparameters=hp.as_dict(),
                train_examples=dataset.train_count,
            )
            if enqueue:
                from tuning.tasks import fine_tune_run

                task_enqueue_on_commit(fine_tune_run, (run.pk,), on_unsent=lambda: FineTuneRun.objects.filter(
                    pk=run.pk, status=FineTuneRun.Status.QUEUED).update(
                        status=FineTuneRun.Status.FAILED, error=unsent_reason("run"), finished_at=timezone.now()),
                    later="the fine-tune run was marked failed; start it again once the queue is back")
    except DatasetError as error:
        raise FineTuneError(str(error)) from None
    except IntegrityError:  # another start won the one-in-progress constraint
        raise FineTuneError("a fine-tune run is already in progress") from None
    return run


def fine_tune_scheduled_check() -> FineTuneRun | None:
    """What the periodic task does: fail stale runs, then start a run (trigger ``schedule``) when at
    least ``TUNING_MIN_NEW_CORRECTIONS`` approved corrections are new since the last snapshot and no
    run is in progress. Returns the run started, or ``None``."""
    runs_fail_stale()
    if FineTuneRun.objects.filter(status__in=FineTuneRun.IN_PROGRESS).exists():
        return None
    if new_approved_since(TrainingDataset.objects.order_by("-version").first()) < settings.TUNING_MIN_NEW_CORRECTIONS:
        return None
    try:
        return fine_tune_run_start(trigger="schedule")
    except FineTuneError as error:
        logger.info("scheduled fine-tune not started: %s", error)
        return None


class RunLost(Exception):
    """The run's status is no longer the one this worker set (the stale-run check marked it failed,
    or another worker took it over): the worker stops and writes nothing more."""


class _RunReporter:
    """Writes of a run's progress, loss curve, heartbeat and status from its worker, each a
    compare-and-set on the status the worker last wrote (``UPDATE ... WHERE status = expected``)."""

    def __init__(self, run: FineTuneRun):
        self.run = run
        self.saved_at = 0.0

    def update(self, **fields) -> None:
        """Write ``fields`` (and the heartbeat) while the run still has the status this worker set.
        Raises ``RunLost`` (nothing written) when it has another."""
        fields["heartbeat_at"] = timezone.now()
        expected = self.run.status
        if not FineTuneRun.objects.filter(pk=self.run.pk, status=expected).update(**fields):
            current = FineTuneRun.objects.filter(pk=self.run.pk).values_list("status", flat=True).first()
            raise RunLost(f"run {self.run.pk} is {current}, no longer {expected}")
        for name, value in fields.items():
            setattr(self.run, name, value)

    def training_progress(self, step: int, total: int, loss: float) -> None:
        self.run.loss_curve.append({"step": step, "loss": round(float(loss), 5)})
        now = time.monotonic()
        if now - self.saved_at >= _SAVE_EVERY_S or step == total:
            self.saved_at = now
            self.update(progress=round(step / max(total, 1), 4), loss_curve=self.run.loss_curve)

    def should_stop(self) -> bool:
        status = FineTuneRun.objects.filter(pk=self.run.pk).values_list("status", flat=True).first()
        return status != FineTuneRun.Status.TRAINING


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fine_tune_run_execute(run_id: int) -> FineTuneRun:
    """Run steps 1-5 of the module docstring for run ``run_id`` (in a worker). Returns the run.

    Safe to call twice: only a ``queued`` run is claimed; any other status returns at once. Errors
    are recorded on the run (``failed`` + ``error``), never raised, except ``FineTuneRun.DoesNotExist``.
    """
    claimed = FineTuneRun.objects.filter(pk=run_id, status=FineTuneRun.Status.QUEUED).update(
        status=FineTuneRun.Status.TRAINING, started_at=timezone.now(), heartbeat_at=timezone.now(), progress=0.0)
    run = FineTuneRun.objects.select_related("dataset").get(pk=run_id)
    if not claimed:
        logger.info("run %s is %s; not running it again", run_id, run.status)
        return run
    reporter = _RunReporter(run)
    started = time.perf_counter()
    stage = "training"
    try:
        from tuning import gguf_lora, parity, training

        import torch

        torch.set_num_threads(settings.TUNING_THREADS)
        records = dataset_records(run.dataset)
        hp = training.LoraHyperparameters(**run.hyperparameters)
        model, tokenizer = training.load_base_model(run.base_model_path)
        result = training.lora_train(model, tokenizer, records, hp, on_progress=reporter.training_progress,
                                     should_stop=reporter.should_stop)
        reporter.update(loss_curve=result.loss_curve, progress=1.0, status=FineTuneRun.Status.EXPORTING,
                        peak_rss_mb=_peak_rss_mb())

        stage = "export"
        folder = Path(settings.TUNING_DIR) / "runs" / str(run.pk)
        folder.mkdir(parents=True, exist_ok=True)
        adapter = gguf_lora.lora_adapter_export(result.peft_model, run.base_model_path, folder / "adapter.gguf",
                                                alpha=hp.alpha)
        report = parity.adapter_parity_check(run.base_model_path, adapter, result.peft_model, tokenizer,
                                             records[:PARITY_PROMPTS], n_threads=settings.TUNING_THREADS)
        parity_data = report.as_dict() if hasattr(report, "as_dict") else asdict(report)
        reporter.update(adapter_path=str(adapter), adapter_sha256=file_sha256(adapter), parity=parity_data,
                        peak_rss_mb=_peak_rss_mb())
        if not report.passed:
            raise RuntimeError(f"parity check failed: {report.reason}")
        del model, result  # free the training copy before the evaluation loads GGUF models

        stage = "evaluation"
        # Published to the artifact storage: the model servers, web processes and later evaluations
        # on other hosts load it from there (each into its own cache), never from this TUNING_DIR.
        candidate = model_version_register(
            name=f"run-{run.pk}-dataset-v{run.dataset.version}", base_model_path=run.base_model_path,
            adapter_path=str(adapter), publish_adapter=True,
            notes=f"LoRA fine-tune run {run.pk} on dataset v{run.dataset.version}",
        )
        reporter.update(model_version=candidate, status=FineTuneRun.Status.EVALUATING, progress=0.0)
        evaluation = evaluate_candidate(run, candidate, reporter)
        stage = "promotion"
        decision = {**evaluation.decision, "evaluation_id": evaluation.pk}
        run_finish(run, evaluation, candidate, decision, duration_s=round(time.perf_counter() - started, 1))
    except RunLost as error:  # the stale-run check failed it meanwhile: its verdict stands
        logger.warning("fine-tune run %s stopped: %s", run.pk, error)
    except training_stopped_errors() as error:
        _fail(run, f"stopped during {stage}: {error}", started)
    except Exception as error:  # recorded on the run; the active version is untouched
        logger.exception("fine-tune run %s failed during %s", run.pk, stage)
        _fail(run, f"{stage} failed: {error}", started)
    run.refresh_from_db()
    return run


def run_finish(run: FineTuneRun, evaluation, candidate: ModelVersion, decision: dict, *, duration_s: float) -> None:
    """Record the gate's ``decision`` on ``run`` (``succeeded``, or ``promoted`` with ``candidate``
    activated when the decision says so) and re-render ``evaluation``'s report with it, all in one
    transaction and only while the run is still ``evaluating`` (compare-and-set).

    Raises ``RunLost`` when the run is no longer ``evaluating`` (nothing written, nothing promoted);
    whatever ``chat.services.model_version_activate`` raises (then nothing is written either).
    """
    from tuning.reports import evaluation_report_html

    finished = timezone.now()
    fields = {"decision": decision, "finished_at": finished, "progress": 1.0, "duration_s": duration_s,
              "peak_rss_mb": _peak_rss_mb(), "heartbeat_at": finished,
              "status": FineTuneRun.Status.PROMOTED if decision["promote"] else FineTuneRun.Status.SUCCEEDED}
    for name, value in fields.items():
        setattr(run, name, value)
    report = evaluation_report_html(evaluation, run=run)
    if decision["promote"]:
        model_version_verify(candidate)  # before the transaction, so a refusal stays recorded
        model_version_server_check(candidate)
    with transaction.atomic():
        if not FineTuneRun.objects.filter(pk=run.pk, status=FineTuneRun.Status.EVALUATING).update(**fields):
            current = FineTuneRun.objects.filter(pk=run.pk).values_list("status", flat=True).first()
            raise RunLost(f"run {run.pk} is {current}, no longer evaluating: its result is not recorded")
        type(evaluation).objects.filter(pk=evaluation.pk).update(report_html=report)
        if decision["promote"]:
            model_version_activate(candidate)


def training_stopped_errors() -> tuple[type[BaseException], ...]:
    from tuning.training import TrainingStopped

    return (TrainingStopped,)


def _fail(run: FineTuneRun, reason: str, started: float) -> None:
    """Mark ``run`` failed with ``reason``, only while it is in progress (a run already failed by the
    stale-run check keeps that reason; a finished one keeps its result)."""
    FineTuneRun.objects.filter(pk=run.pk, status__in=FineTuneRun.IN_PROGRESS).update(
        status=FineTuneRun.Status.FAILED, error=reason[:4000], finished_at=timezone.now(),
        duration_s=round(time.perf_counter() - started, 1), peak_rss_mb=_peak_rss_mb(),
    )


def evaluate_candidate(run: FineTuneRun, candidate: ModelVersion, reporter: _RunReporter | None = None):
    """``tuning.evaluation.evaluation_run`` of ``candidate`` on ``run``'s dataset, reporting progress."""
    from tuning.evaluation import evaluation_run

    def progress(done: float, total: int) -> None:
        if reporter is not None:
            reporter.update(progress=round(done / total, 4))

    return evaluation_run(run.dataset, candidate, run=run, on_progress=progress)


def model_version_rollback(version_id: int) -> ModelVersion:
    """Serve an earlier version again (any registered version: the base or an earlier adapter).

    Raises ``ModelVersion.DoesNotExist`` for an unknown id, ``FileNotFoundError`` when a local file is
    gone, ``chat.engine.EngineError`` when a file of the artifact storage is missing there (or the
    storage fails) and ``chat.engine.ModelFilesMismatch`` when a file is not the one registered (the
    reason is recorded on the version); the active version is then unchanged."""
    from chat.model_artifacts import is_artifact

    version = ModelVersion.objects.get(pk=version_id)
    for path in filter(None, (version.base_model_path, version.adapter_path)):
        if not is_artifact(path) and not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
    return model_version_activate(version)
