"""Dashboard pages of the tuning loop: runs and versions for agents; "fine-tune now" and serving
another version for admins (staff) only; the stored report is escaped and served sandboxed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from django.test import Client

from chat.models import ModelVersion
from tuning import services
from tuning.models import FineTuneRun, ModelEvaluation, TrainingDataset
from tuning.reports import evaluation_report_html

pytestmark = pytest.mark.django_db


@pytest.fixture
def versions(tmp_path):
    base_file, adapter_file = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    base_file.write_bytes(b"GGUF base")
    adapter_file.write_bytes(b"GGUF adapter")
    base_sha, adapter_sha = hashlib.sha256(b"GGUF base").hexdigest(), hashlib.sha256(b"GGUF adapter").hexdigest()
    base = ModelVersion.objects.create(name="base", base_model_path=str(base_file), base_model_sha256=base_sha, is_active=True)
    tuned = ModelVersion.objects.create(name="run-1", base_model_path=str(base_file), base_model_sha256=base_sha,
                                        adapter_path=str(adapter_file), adapter_sha256=adapter_sha)
    return base, tuned


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_agents_see_runs_and_versions_but_cannot_start_or_switch(agent, versions):
    base, tuned = versions
    client = client_for(agent)
    page = client.get("/dashboard/fine-tunes/")
    assert page.status_code == 200 and b"run-1" in page.content and b"Fine-tune now" not in page.content
    assert client.post("/dashboard/fine-tunes/start/").status_code == 403
    assert client.post(f"/dashboard/fine-tunes/versions/{tuned.pk}/activate/").status_code == 403
    assert FineTuneRun.objects.count() == 0 and ModelVersion.objects.get(is_active=True) == base


def test_staff_switch_the_served_version_in_one_click(staff, versions):
    base, tuned = versions
    client = client_for(staff)
    response = client.post(f"/dashboard/fine-tunes/versions/{tuned.pk}/activate/", follow=True)
    assert b"Now serving run-1." in response.content
    assert ModelVersion.objects.get(is_active=True) == tuned
    client.post(f"/dashboard/fine-tunes/versions/{base.pk}/activate/")
    assert ModelVersion.objects.get(is_active=True) == base


def test_a_version_whose_files_are_gone_is_not_served(staff, versions):
    base, tuned = versions
    ModelVersion.objects.filter(pk=tuned.pk).update(adapter_path="/nonexistent/adapter.gguf")
    response = client_for(staff).post(f"/dashboard/fine-tunes/versions/{tuned.pk}/activate/", follow=True)
    assert b"cannot serve it: model file not found: /nonexistent/adapter.gguf" in response.content
    assert ModelVersion.objects.get(is_active=True) == base


def test_a_version_whose_file_changed_since_registration_is_refused_with_the_reason(staff, versions):
    # given the adapter file overwritten after the version was registered
    base, tuned = versions
    Path(tuned.adapter_path).write_bytes(b"GGUF adapter, tampered")
    # when staff try to serve it
    response = client_for(staff).post(f"/dashboard/fine-tunes/versions/{tuned.pk}/activate/", follow=True)
    # then it is refused with the reason, recorded on the version and shown, and the base keeps serving
    actual = hashlib.sha256(b"GGUF adapter, tampered").hexdigest()
    reason = f"{tuned.adapter_path} has sha256 {actual}, but {tuned.adapter_sha256} was recorded for it"
    assert f"cannot serve it: {reason}".encode() in response.content
    tuned.refresh_from_db()
    assert tuned.refused_reason == reason and tuned.refused_at is not None and tuned.is_active is False
    assert ModelVersion.objects.get(is_active=True) == base
    assert b"refused" in client_for(staff).get("/dashboard/fine-tunes/").content


def test_fine_tune_now_without_approved_corrections_explains_and_queues_nothing(staff, versions):
    response = client_for(staff).post("/dashboard/fine-tunes/start/", follow=True)
    assert b"no approved corrections" in response.content
    assert FineTuneRun.objects.count() == 0 and TrainingDataset.objects.count() == 0


def test_fine_tune_now_queues_a_run_on_a_new_snapshot(staff, agent, agent2, conversation, knowledge, versions, settings):
    settings.TUNING_HOLDOUT_SHARE = 0.0
    answer = conversation.messages.filter(role="assistant").order_by("-id").first()
    correction = services.correction_create(answer.pk, author=agent, corrected_answer="Five business days [1].",
                                            reason="wrong_fact", supporting_chunk_ids=[knowledge["refunds"].pk])
    services.correction_review(correction.pk, reviewer=agent2, approve=True)
    response = client_for(staff).post("/dashboard/fine-tunes/start/", follow=True)
    run = FineTuneRun.objects.get()
    assert (run.status, run.trigger, run.requested_by, run.dataset.version, run.train_examples) == ("queued", "manual", staff, 1, 1)
    assert response.redirect_chain[-1][0] == f"/dashboard/fine-tunes/{run.pk}/"
    assert b"Fine-tune run" in response.content and b"Queued" in response.content
    # a second click while it is in progress is refused
    again = client_for(staff).post("/dashboard/fine-tunes/start/", follow=True)
    assert b"already in progress" in again.content and FineTuneRun.objects.count() == 1


def test_report_escapes_model_text_and_is_served_sandboxed(agent, versions, conversation, knowledge, agent2):
    base, tuned = versions
    dataset = TrainingDataset.objects.create(version=1, sha256="c" * 64, recipe={"method": "raft"})
    arms = {name: {"version": "v", "questions": 1, "answerable": 1, "unanswerable": 0, "token_f1": 0.5, "markers": 0}
            for name in ("base+retrieval", "candidate", "candidate+retrieval", "active+retrieval")}
    evaluation = ModelEvaluation.objects.create(dataset=dataset, status="succeeded", arms=arms, rows=[
        {"arm": "candidate", "example_id": 1, "question": "<img src=x onerror=alert(1)>", "reference": "ok",
         "text": "<script>alert(2)</script>", "f1": 0.0, "declined": False}])
    evaluation.report_html = evaluation_report_html(evaluation)
    evaluation.save()
    assert "<script>alert(2)" not in evaluation.report_html and "&lt;script&gt;alert(2)" in evaluation.report_html
    assert "<img src=x" not in evaluation.report_html
    response = client_for(agent).get(f"/dashboard/fine-tunes/evaluations/{evaluation.pk}/report/")
    assert response.status_code == 200 and "sandbox" in response["Content-Security-Policy"]


def test_the_run_page_and_the_report_show_the_gates_interval_and_checks(agent, versions):
    # given a run kept by the gate with its interval (as gate_decide records it)
    from tuning.evaluation import GateTolerances, gate_decide

    base, tuned = versions
    dataset = TrainingDataset.objects.create(version=1, sha256="c" * 64, recipe={"method": "raft"})
    metrics = {"token_f1": 0.5, "citation_validity": 1.0, "markers": 2, "abstention_accuracy": None,
               "citation_precision": 0.5, "false_abstention": 0.0, "errors": 0}
    arms = {name: {**metrics, "version": "v", "questions": 3, "answerable": 3, "unanswerable": 0}
            for name in ("base+retrieval", "candidate", "candidate+retrieval", "active+retrieval")}
    rows = [{"arm": arm, "example_id": i, "answerable": True, "f1": f, "question": "q", "reference": "r",
             "text": "t", "declined": False}
            for arm, scores in (("candidate+retrieval", [0.9, 0.1, 0.5]), ("active+retrieval", [0.1, 0.9, 0.5]))
            for i, f in enumerate(scores, start=1)]
    decision = gate_decide(arms, rows, GateTolerances())
    run = FineTuneRun.objects.create(dataset=dataset, status="succeeded", base_model_path=base.base_model_path,
                                     base_model_sha256=base.base_model_sha256, decision=decision)
    evaluation = ModelEvaluation.objects.create(run=run, dataset=dataset, status="succeeded", arms=arms, rows=rows,
                                                decision=decision)
    evaluation.report_html = evaluation_report_html(evaluation, run=run)
    evaluation.save()
    interval = decision["f1_gain_interval"]
    shown = f"95% interval [{interval['low']:.4f}, {interval['high']:.4f}] (paired bootstrap, percentile, 10000 resamples, seed 0)"
    # when an agent opens the run page, then the verdict, its reason and the interval are on it
    page = client_for(agent).get(f"/dashboard/fine-tunes/{run.pk}/").content.decode()
    assert decision["promote"] is False and "Not promoted" in page and "so the gain may be noise" in page
    assert shown in page and "lower end &gt; 0.0" in page
    # and in the stored report
    assert shown in evaluation.report_html and "citation precision change" in evaluation.report_html


def test_the_fine_tunes_page_shows_embedder_runs_and_embedding_versions_live(staff, agent):
    from django.utils import timezone

    from knowledge.models import EmbeddingModelVersion
    from tuning.models import EmbedderRun

    # Given an embedder run re-embedding into its candidate version, half done
    version = EmbeddingModelVersion.objects.create(name="embedder-run-1-abc", path="/tmp/candidate", dimension=384,
                                                   status="building", progress=0.5, chunks_done=50, chunks_total=100,
                                                   note="embedder run 1")
    run = EmbedderRun.objects.create(status="reembedding", base_model_path="/tmp/base", base_model_sha256="0" * 64,
                                     holdout_share=0.2, examples_sha256="0" * 64, train_count=40, heldout_count=10,
                                     progress=1.0, reembedding_progress=0.5, embedding_version=version)

    # When staff open the Fine-tunes page, then the run's stage and progress show, and the page reloads itself
    page = client_for(staff).get("/dashboard/fine-tunes/").content.decode()
    assert 'http-equiv="refresh"' in page
    assert "Re-embedding (shadow)" in page and 're-embedding <progress max="1" value="0.5"></progress> 50%' in page
    assert "(50 / 100 chunks)" in page and "embedder-run-1-abc" in page and "50 / 100 chunks" in page
    assert f'href="/admin/tuning/embedderrun/{run.pk}/change/"' in page

    # When its version is being promoted, then both show it, still live
    EmbedderRun.objects.filter(pk=run.pk).update(status="promoting")
    EmbeddingModelVersion.objects.filter(pk=version.pk).update(
        status="promoting", promoting_from="ready", promotion_requested_at=timezone.now(), heartbeat_at=timezone.now())
    page = client_for(agent).get("/dashboard/fine-tunes/").content.decode()
    assert 'http-equiv="refresh"' in page
    assert "promoting: switching every process to embedder-run-1-abc" in page
    assert "Promoting (switch queued or running)" in page
    assert "/admin/tuning/embedderrun/" not in page  # agents see progress, not the admin

    # When it is done (promoted, serving with a fitted threshold), then the page stops reloading
    EmbedderRun.objects.filter(pk=run.pk).update(status="succeeded", promoted=True,
                                                 decision={"promote": True, "reason": "MRR@10 0.5 vs 0.4"})
    EmbeddingModelVersion.objects.filter(pk=version.pk).update(status="active", abstain_max_distance=0.71,
                                                               curated_match_max_distance=0.23)
    page = client_for(staff).get("/dashboard/fine-tunes/").content.decode()
    assert 'http-equiv="refresh"' not in page
    assert "promote: MRR@10 0.5 vs 0.4 (promoted)" in page and "embedder-run-1-abc <strong>(serving)</strong>" in page
    assert "<td>0.71 (fitted)</td>" in page and "<td>0.23 (fitted)</td>" in page
