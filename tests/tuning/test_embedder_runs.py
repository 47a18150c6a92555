"""Embedder runs (``tuning.embedder_runs``) on real Postgres with the real MiniLM embedder: snapshot at
start, training and held-out comparison in ``embedder_run_execute``, one run at a time, failures
recorded with their reason, serving untouched; the admin's "Retrain retriever now"."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from chat.models import Conversation, Message
from knowledge.models import Chunk
from knowledge.services import document_ingest, source_upload
from tuning.datasets import correction_split
from tuning.embedder_runs import (
    EmbedderRunError,
    embedder_run_execute,
    embedder_run_start,
    embedder_runs_fail_stale,
)
from tuning.models import Correction, EmbedderRun
from tuning.services import chunk_snapshot

PAGES = {
    "passports.md": "# Passports\n\nRenewal takes six to eight weeks after we receive your form.\n\n"
                    "A passport photo must be two by two inches, in colour.",
    "fines.md": "# Fines\n\nParking penalties may be paid with a credit or debit card online.\n\n"
                "Speeding tickets add points to your driving record.",
    "benefits.md": "# Benefits\n\nA widow or widower aged 60 or older may receive survivor payments.\n\n"
                   "Report a death by calling our office.",
}
QUESTIONS = [  # (question, page, paragraph index of the answer)
    ("How long does a passport renewal take?", "passports.md", 0),
    ("What size should my passport photo be?", "passports.md", 1),
    ("Can I pay a parking fine by card?", "fines.md", 0),
    ("Do speeding tickets give me points?", "fines.md", 1),
    ("Who can get survivor benefits?", "benefits.md", 0),
    ("How do I report a death?", "benefits.md", 1),
]
HOLDOUT = 0.5


@pytest.fixture
def corrections(db, settings, tmp_path) -> list[Correction]:
    """Three ingested pages (real embeddings) and one seeded, approved correction per question; its
    group is chosen so that half the groups fall in the held-out split at ``HOLDOUT``."""
    settings.TUNING_DIR = tmp_path / "tuning"
    chunks = {}
    for name, text in PAGES.items():
        source = source_upload(filename=name, data=text.encode())
        assert document_ingest(source.pk).status == "ingested"
        chunks[name] = list(Chunk.objects.filter(source=source).select_related("source").order_by("ordinal"))
    heldout_groups = (g for g in (f"dialogue-{i}" for i in range(100))
                      if correction_split(Correction(seeded=True, seed_group=g), HOLDOUT) == "heldout")
    train_groups = (g for g in (f"dialogue-{i}" for i in range(100))
                    if correction_split(Correction(seeded=True, seed_group=g), HOLDOUT) == "train")
    made = []
    for i, (question, page, index) in enumerate(QUESTIONS):
        paragraph = PAGES[page].split("\n\n")[index + 1]
        answer_chunk = next(c for c in chunks[page] if paragraph[:30] in c.text)
        other = [c for name in PAGES for c in chunks[name] if c.pk != answer_chunk.pk]
        conversation = Conversation.objects.create(collection="default")
        message = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, text="")
        made.append(Correction.objects.create(
            message=message, reason=Correction.Reason.WRONG_FACT, corrected_answer="see the page", question=question,
            shown_chunks=[chunk_snapshot(c) for c in other[:3]], supporting_chunks=[chunk_snapshot(answer_chunk)],
            status=Correction.Status.APPROVED, seeded=True, seed_key=f"k{i}",
            seed_group=next(heldout_groups) if i % 3 == 0 else next(train_groups),
        ))
    return made


def stored_vectors() -> dict[int, list[float]]:
    return {c.pk: list(np.asarray(c.embedding)) for c in Chunk.objects.all()}


def test_an_embedder_run_snapshots_trains_and_compares_on_held_out_corrections_without_touching_serving(corrections, settings):
    # Given six approved corrections, two of them in held-out groups
    before = stored_vectors()

    # When a run starts (no Celery here) and a worker executes it
    run = embedder_run_start(trigger="command", holdout_share=HOLDOUT, hyperparameters={"batch_size": 2, "epochs": 2},
                             enqueue=False)

    # Then the snapshot holds the four training and two held-out examples, with the hyper-parameters
    assert (run.status, run.train_count, run.heldout_count, run.corrections_count) == ("queued", 4, 2, 6)
    assert {r["correction_id"] for r in run.heldout_examples} == {corrections[0].pk, corrections[3].pk}
    assert run.hyperparameters["batch_size"] == 2 and len(run.examples_sha256) == 64
    run = embedder_run_execute(run.pk)

    # and the run succeeded with a loss curve, a saved candidate of the same dimension and both arms scored
    assert run.status == "succeeded", run.error
    steps = [p["step"] for p in run.loss_curve]
    assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)) and run.progress == 1.0
    assert Path(run.model_path, "config.json").is_file() and len(run.model_sha256) == 64 and run.dimension == 384
    assert run.evaluation["chunks"] == Chunk.objects.count() >= 3
    assert run.evaluation["served"]["n"] == run.evaluation["candidate"]["n"] == 2
    assert set(run.evaluation["candidate"]) == {"n", "passage_hit@1", "passage_hit@5", "passage_hit@10",
                                                "document_hit@5", "mrr"}
    # (fewer than ten chunks: every held-out gold chunk is in the top 10 of both arms)
    assert run.evaluation["served"]["passage_hit@10"] == run.evaluation["candidate"]["passage_hit@10"] == 1.0
    assert run.duration_s > 0 and run.training_s > 0 and run.peak_rss_mb > 0 and run.finished_at is not None
    # and what is served did not change
    assert stored_vectors() == before

    # When the task is delivered again, then nothing runs twice
    again = embedder_run_execute(run.pk)
    assert (again.status, again.finished_at, again.loss_curve) == ("succeeded", run.finished_at, run.loss_curve)


def test_only_one_embedder_run_at_a_time_and_a_killed_one_is_failed_after_the_stale_delay(corrections, settings):
    # Given a queued run
    first = embedder_run_start(holdout_share=HOLDOUT, enqueue=False)

    # When another starts, then it is refused and nothing is stored
    with pytest.raises(EmbedderRunError, match="already in progress"):
        embedder_run_start(holdout_share=HOLDOUT, enqueue=False)
    assert EmbedderRun.objects.count() == 1

    # When its worker died (no heartbeat for longer than TUNING_RUN_STALE_S), then it is failed with the reason
    EmbedderRun.objects.filter(pk=first.pk).update(
        status="training", heartbeat_at=timezone.now() - timedelta(seconds=settings.TUNING_RUN_STALE_S + 1))
    assert embedder_runs_fail_stale() == 1
    first.refresh_from_db()
    assert first.status == "failed" and first.error.startswith("the worker stopped reporting during training")
    # and a new run may start
    assert embedder_run_start(holdout_share=HOLDOUT, enqueue=False).status == "queued"


def test_corrections_without_evidence_chunks_cannot_start_a_run(corrections):
    # Given the corrections lose their evidence chunks (abstentions: nothing to learn for retrieval)
    Correction.objects.update(supporting_chunks=[])

    # When a run starts, then it is refused with the reason and nothing is stored
    with pytest.raises(EmbedderRunError, match="0 training example"):
        embedder_run_start(holdout_share=HOLDOUT, enqueue=False)
    assert not EmbedderRun.objects.exists()


def test_a_run_whose_model_cannot_be_trained_fails_with_the_reason_and_serving_is_untouched(corrections, tmp_path):
    # Given a queued run whose base model folder is gone by the time the worker starts
    before = stored_vectors()
    run = embedder_run_start(holdout_share=HOLDOUT, enqueue=False)
    EmbedderRun.objects.filter(pk=run.pk).update(base_model_path=str(tmp_path / "missing-model"))

    # When it executes, then it is failed with the stage and the reason, and the vectors are unchanged
    run = embedder_run_execute(run.pk)
    assert run.status == "failed" and run.error.startswith("training failed:") and "missing-model" in run.error
    assert run.finished_at is not None and run.model_path == ""
    assert stored_vectors() == before


def test_retrain_retriever_now_queues_a_run_for_an_admin_and_refuses_others(corrections, client, settings, monkeypatch,
                                                                            django_capture_on_commit_callbacks):
    settings.TUNING_HOLDOUT_SHARE = HOLDOUT
    url = reverse("admin:tuning_embedderrun_retrain")
    # Given a staff member without the permission, when they press the button, then no run is queued
    client.force_login(User.objects.create_user("sam", password="pw", is_staff=True))
    response = client.post(url)
    assert response.status_code == 302 and not EmbedderRun.objects.exists()

    # Given a superuser, when they press it, then one run is queued on commit (the Celery task is sent)
    sent = []
    from tuning import tasks

    monkeypatch.setattr(tasks.embedder_run, "apply_async", lambda args, kwargs: sent.append(args[0]))
    client.force_login(User.objects.create_superuser("ada", password="pw"))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url)
    run = EmbedderRun.objects.get()
    assert response.status_code == 302 and run.status == "queued" and run.trigger == "manual"
    assert sent == [run.pk] and run.requested_by.username == "ada"
    # and a GET does nothing, while the runs page lists the run under the button
    assert client.get(url).status_code == 405
    page = client.get(reverse("admin:tuning_embedderrun_changelist"))
    assert page.status_code == 200 and b"Retrain retriever now" in page.content
    assert client.get(reverse("admin:tuning_embedderrun_change", args=[run.pk])).status_code == 200


def test_fine_tune_embedder_command_reports_why_it_cannot_start(corrections):
    # Given no correction with evidence chunks, when the command runs, then it fails with the reason
    from django.core.management import CommandError, call_command

    Correction.objects.update(supporting_chunks=[])
    with pytest.raises(CommandError, match="need at least 2"):
        call_command("fine_tune_embedder", "--sync")
    assert not EmbedderRun.objects.exists()
