"""Run status transitions are compare-and-set: once the stale-run check has marked a run failed, its
worker (which did not die, only stalled) can neither write progress, nor ``succeeded``, nor promote."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from chat.models import ModelVersion
from tuning.fine_tuning import RunLost, _fail, _RunReporter, run_finish, runs_fail_stale
from tuning.models import FineTuneRun, ModelEvaluation, TrainingDataset

pytestmark = pytest.mark.django_db

DECISION = {"promote": True, "reason": "better", "f1_gain": 0.1, "f1_gain_interval": None, "tolerances": {}}


@pytest.fixture
def evaluating(tmp_path):
    """A run in ``evaluating`` with its candidate version registered (inactive), its evaluation, and
    the active base version: ``(run, evaluation, candidate, base)``."""
    files = {}
    for name in ("base", "adapter"):
        files[name] = tmp_path / f"{name}.gguf"
        files[name].write_bytes(f"GGUF {name}".encode())
    digest = {name: hashlib.sha256(f"GGUF {name}".encode()).hexdigest() for name in files}
    base = ModelVersion.objects.create(name="base", base_model_path=str(files["base"]), base_model_sha256=digest["base"],
                                       is_active=True)
    candidate = ModelVersion.objects.create(name="run-1", base_model_path=str(files["base"]),
                                            base_model_sha256=digest["base"], adapter_path=str(files["adapter"]),
                                            adapter_sha256=digest["adapter"])
    dataset = TrainingDataset.objects.create(version=1, sha256="c" * 64, recipe={"method": "raft"})
    run = FineTuneRun.objects.create(dataset=dataset, status="evaluating", base_model_path=base.base_model_path,
                                     base_model_sha256=base.base_model_sha256, model_version=candidate,
                                     heartbeat_at=timezone.now())
    evaluation = ModelEvaluation.objects.create(run=run, dataset=dataset, status="succeeded", arms={}, rows=[],
                                                decision=DECISION, report_html="before")
    return run, evaluation, candidate, base


def stall(run: FineTuneRun) -> None:
    """The worker stops reporting for longer than TUNING_RUN_STALE_S; the stale check fails the run."""
    FineTuneRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(hours=2))
    assert runs_fail_stale() == 1


def test_a_run_failed_by_the_stale_check_cannot_report_progress(evaluating):
    run, _, _, _ = evaluating
    reporter = _RunReporter(run)
    reporter.update(progress=0.25)  # while it is its own
    stall(run)
    with pytest.raises(RunLost, match=f"run {run.pk} is failed, no longer evaluating"):
        reporter.update(progress=0.5)
    run.refresh_from_db()
    assert (run.status, run.progress) == ("failed", 0.25)
    assert run.error.startswith("the worker stopped reporting during evaluating")


def test_a_run_failed_by_the_stale_check_never_succeeds_nor_promotes(evaluating):
    run, evaluation, candidate, base = evaluating
    stall(run)
    # when its worker comes back with a promoting decision
    with pytest.raises(RunLost):
        run_finish(run, evaluation, candidate, DECISION, duration_s=12.0)
    # then nothing of it was written: still failed, no decision, the base serving, the report as it was
    run.refresh_from_db()
    assert (run.status, run.decision, run.duration_s) == ("failed", {}, None)
    assert ModelVersion.objects.get(is_active=True) == base
    evaluation.refresh_from_db()
    assert evaluation.report_html == "before"
    # and the worker's own failure handling does not overwrite the stale check's reason either
    _fail(run, "evaluation failed: something", 0.0)
    run.refresh_from_db()
    assert run.status == "failed" and run.error.startswith("the worker stopped reporting")


def test_a_run_still_evaluating_is_promoted_in_one_step(evaluating):
    run, evaluation, candidate, base = evaluating
    run_finish(run, evaluation, candidate, DECISION, duration_s=12.0)
    run.refresh_from_db()
    assert (run.status, run.decision, run.duration_s, run.progress) == ("promoted", DECISION, 12.0, 1.0)
    assert ModelVersion.objects.get(is_active=True) == candidate
    evaluation.refresh_from_db()
    assert "Promote" in evaluation.report_html
    # and the stale check leaves a finished run alone
    FineTuneRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(hours=2))
    assert runs_fail_stale() == 0


def test_a_refusing_decision_records_succeeded_and_keeps_the_active_version(evaluating):
    run, evaluation, candidate, base = evaluating
    keep = {**DECISION, "promote": False, "reason": "the gain may be noise"}
    run_finish(run, evaluation, candidate, keep, duration_s=3.0)
    run.refresh_from_db()
    assert (run.status, run.decision["reason"]) == ("succeeded", "the gain may be noise")
    assert ModelVersion.objects.get(is_active=True) == base


def test_a_promotion_whose_files_changed_writes_nothing(evaluating):
    run, evaluation, candidate, base = evaluating
    with open(candidate.adapter_path, "ab") as handle:
        handle.write(b" tampered")
    with pytest.raises(Exception, match="was recorded for it"):
        run_finish(run, evaluation, candidate, DECISION, duration_s=12.0)
    run.refresh_from_db()
    assert (run.status, run.decision) == ("evaluating", {})
    assert ModelVersion.objects.get(is_active=True) == base
    candidate.refresh_from_db()
    assert candidate.refused_reason.startswith(f"{candidate.adapter_path} has sha256 ")
