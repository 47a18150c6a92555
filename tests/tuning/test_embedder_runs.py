"""Embedder runs (``tuning.embedder_runs``) on real Postgres with the real MiniLM embedder: snapshot at
start; training, shadow re-embedding, the gate through ``chunk_search`` and promotion in
``embedder_run_execute`` (refused by the default gate, promoted when forced, rolled back in one
action); one run at a time, failures recorded with their reason, serving untouched unless promoted;
the admin's "Retrain retriever now"."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from chat.models import Conversation, Message
from knowledge.models import Chunk, ChunkEmbedding, EmbeddingModelVersion
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
    # Given six approved corrections, two of them in held-out groups, and a gate no candidate passes
    settings.TUNING_EMBEDDER_GATE_MIN_MRR_GAIN = 1.0
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


def served_state() -> tuple[dict[int, list[float]], set[str], str]:
    """The served vectors, the model ids on the chunks, and the active version's identity."""
    from knowledge.embedding import model_id

    return stored_vectors(), set(Chunk.objects.values_list("embedding_model", flat=True)), model_id()


def test_the_gate_refuses_a_candidate_that_does_not_win_and_nothing_served_changes(corrections, settings):
    # Given a gate no candidate can pass (the MRR gain's interval must lie above +1, the most there is)
    settings.TUNING_EMBEDDER_GATE_MIN_MRR_GAIN = 1.0
    before = served_state()

    # When a run trains (1 epoch), re-embeds into the candidate's shadow vectors and gates it
    run = embedder_run_start(holdout_share=HOLDOUT, hyperparameters={"batch_size": 2, "epochs": 1}, enqueue=False)
    run = embedder_run_execute(run.pk)

    # Then the run succeeded, the candidate was built and compared through chunk_search, and refused
    assert run.status == "succeeded", run.error
    version = run.embedding_version
    assert version is not None and version.name.startswith(f"embedder-run-{run.pk}-")
    assert run.reembedding_progress == 1.0 and run.evaluation["chunks"] == Chunk.objects.count() == 3
    assert run.evaluation["served"]["n"] == run.evaluation["candidate"]["n"] == 2 == len(run.evaluation["rows"])
    decision = run.decision
    assert decision["promote"] is False and run.promoted is False
    assert decision["served"] == run.evaluation["served"] and decision["mrr_gain_interval"]["questions"] == 2
    assert decision["gate"]["min_mrr_gain"] == 1.0 and "its lower end is not above +1.0000" in decision["reason"]
    # and the candidate is rejected, its shadow vectors dropped, and what is served is unchanged
    version.refresh_from_db()
    assert version.status == "rejected" and decision["reason"] in version.reason
    assert not ChunkEmbedding.objects.filter(version=version).exists()
    assert served_state() == before
    assert EmbeddingModelVersion.objects.get(status="active").model_id == before[2]


def test_an_embedder_run_promotes_a_candidate_that_passes_the_gate_and_one_action_rolls_it_back(corrections, settings,
                                                                                                client, monkeypatch):
    # Given a gate forced open (any MRR gain, any drop in hits, any change in what it declines)
    settings.TUNING_EMBEDDER_GATE_MIN_MRR_GAIN = -1.0
    settings.TUNING_EMBEDDER_GATE_HIT_TOLERANCE = 1.0
    settings.TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE = 1.0
    before = served_state()
    # and a spy on the switch, which records what the run and its version show while it runs
    from knowledge import services as knowledge_services

    real_switch, seen = knowledge_services.embedding_version_promotion_run, {}

    def spying(version_id, **kwargs):
        seen["run"] = EmbedderRun.objects.values_list("status", flat=True).get()
        seen["version"] = EmbeddingModelVersion.objects.get(pk=version_id).status
        return real_switch(version_id, **kwargs)

    monkeypatch.setattr(knowledge_services, "embedding_version_promotion_run", spying)

    # When a run trains, re-embeds, gates and promotes
    run = embedder_run_start(holdout_share=HOLDOUT, hyperparameters={"batch_size": 2, "epochs": 1}, enqueue=False)
    run = embedder_run_execute(run.pk)

    # Then both showed "promoting" during the switch
    assert seen == {"run": "promoting", "version": "promoting"}
    # and its version serves: every chunk holds the candidate's vectors, and queries are embedded by it
    assert run.status == "succeeded", run.error
    assert run.decision["promote"] is True and run.promoted is True
    version = run.embedding_version
    version.refresh_from_db()
    assert version.status == "active" and version.path == run.model_path and version.sha256 == run.model_sha256
    # with the active version's abstention thresholds carried over (2 held-out questions: too few to fit)
    abstention = run.decision["abstention"]
    assert (abstention["method"], abstention["questions"]) == ("carried", 2)
    assert (version.abstain_max_distance, version.follow_up_max_distance) == (settings.ABSTAIN_MAX_DISTANCE,
                                                                              settings.FOLLOW_UP_MAX_DISTANCE)
    assert version.calibration["method"] == "carried" and version.calibration["run"] == run.pk
    # and so are its own-words margin and curated-answer match threshold (no curated answers to fit on)
    assert version.follow_up_own_margin == settings.FOLLOW_UP_OWN_MARGIN
    assert run.decision["curated_match"]["method"] == "carried" and run.decision["curated_match"]["questions"] == 0
    assert version.curated_match_max_distance == settings.CURATED_MATCH_MAX_DISTANCE
    assert abstention["answerable"]["served"]["n"] == 2 and abstention["unanswerable"]["served"]["n"] == 0
    from knowledge.embedding import get_embedding_model, model_id

    assert model_id() == version.model_id == get_embedding_model().model_id
    assert set(Chunk.objects.values_list("embedding_model", flat=True)) == {version.model_id}
    candidate = get_embedding_model()
    chunk = Chunk.objects.select_related("source").order_by("pk").first()
    from knowledge.services.reembedding import embedding_text

    assert np.allclose(np.asarray(chunk.embedding), candidate.encode([embedding_text(chunk.source, chunk)])[0],
                       atol=1e-5)
    assert stored_vectors() != before[0]
    # and the previous version is retired with its vectors kept
    previous = EmbeddingModelVersion.objects.get(status="retired")
    assert previous.model_id == before[2]
    assert ChunkEmbedding.objects.filter(version=previous).count() == Chunk.objects.count()

    # and the run's admin page shows the gate's decision with its numbers
    from django.urls import reverse

    client.force_login(User.objects.create_superuser("ada", password="pw"))
    page = client.get(reverse("admin:tuning_embedderrun_change", args=[run.pk])).content.decode()
    assert "Promotion gate" in page and "<strong>promote</strong>" in page and "MRR@10" in page
    assert f"<td>{run.decision['candidate']['mrr']}</td>" in page
    assert (f"<td>curated-answer match threshold (cosine distance)</td><td>{settings.CURATED_MATCH_MAX_DISTANCE}</td>"
            f"<td>{settings.CURATED_MATCH_MAX_DISTANCE} (carried)</td>") in page

    # When an admin rolls back (one action), then the previous vectors serve again, unchanged
    from knowledge.services import embedding_version_rollback

    assert embedding_version_rollback().pk == previous.pk
    assert served_state() == before


def test_a_run_whose_re_embedding_dies_fails_and_leaves_the_active_version_serving(corrections, monkeypatch):
    # Given a run whose shadow re-embedding breaks part way
    before = served_state()
    from knowledge.services import embedding_versions

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedding_versions, "_create_shadow_index", broken)
    run = embedder_run_start(holdout_share=HOLDOUT, hyperparameters={"batch_size": 2, "epochs": 1}, enqueue=False)

    # When it executes, then it fails with the stage and reason, its version failed and dropped
    run = embedder_run_execute(run.pk)
    assert run.status == "failed" and run.error == "re-embedding failed: disk full" and run.promoted is False
    version = EmbeddingModelVersion.objects.get(pk=run.embedding_version_id)
    assert version.status == "failed" and "disk full" in version.reason
    assert not ChunkEmbedding.objects.filter(version=version).exists()
    # and serving is untouched
    assert served_state() == before


def test_a_stale_embedder_run_fails_its_half_built_version(corrections, settings):
    # Given a run re-embedding whose worker died, with a half-built candidate version
    from knowledge.services import embedding_version_register

    run = embedder_run_start(holdout_share=HOLDOUT, enqueue=False)
    version = embedding_version_register(name="half-built", path=settings.EMBEDDING_MODEL, dimension=384)
    EmbedderRun.objects.filter(pk=run.pk).update(
        status="reembedding", embedding_version=version,
        heartbeat_at=timezone.now() - timedelta(seconds=settings.TUNING_RUN_STALE_S + 1))

    # When the stale check runs, then the run and its version are failed
    assert embedder_runs_fail_stale() == 1
    run.refresh_from_db()
    version.refresh_from_db()
    assert run.status == "failed" and run.error.startswith("the worker stopped reporting during reembedding")
    assert version.status == "failed" and version.reason.startswith(f"embedder run {run.pk}:")


def _rows(served: list[tuple[float, int, int]], candidate: list[tuple[float, int, int]]) -> dict:
    """A comparison of ``embedder_gate_compare``'s shape from per-question (rr, passage-hit@5, document-hit@5)."""
    from tuning.embedder_evaluation import _summary

    def scores(rr, p5, d5):
        return {"rr": rr, "passage_hit@1": int(rr == 1.0), "passage_hit@5": p5, "passage_hit@10": p5,
                "document_hit@5": d5}

    rows = [{"query": f"q{i}", "served": scores(*s), "candidate": scores(*c)}
            for i, (s, c) in enumerate(zip(served, candidate))]
    return {"served": _summary([r["served"] for r in rows]), "candidate": _summary([r["candidate"] for r in rows]),
            "rows": rows}


def test_the_embedder_gate_promotes_a_clear_gain_and_refuses_noise_or_lost_passages():
    from tuning.embedder_evaluation import EmbedderGate, embedder_gate_decide

    gate = EmbedderGate(min_mrr_gain=0.0, hit_tolerance=0.0, resamples=2000, seed=0)
    # Given a candidate that ranks the gold passage first for 20 questions the active one ranked second
    clear = _rows([(0.5, 1, 1)] * 20, [(1.0, 1, 1)] * 20)
    decision = embedder_gate_decide(clear, gate)
    assert decision["promote"] is True and decision["mrr_gain"] == 0.5
    assert decision["mrr_gain_interval"]["low"] == 0.5 and decision["passage_hit@5_change"] == 0.0

    # Given gains and losses that cancel out (noise), then it is refused with the interval in the reason
    noise = _rows([(0.5, 1, 1)] * 10 + [(1.0, 1, 1)] * 10, [(1.0, 1, 1)] * 10 + [(0.5, 1, 1)] * 10)
    decision = embedder_gate_decide(noise, gate)
    assert decision["promote"] is False and decision["mrr_gain"] == 0.0 and "may be noise" in decision["reason"]

    # Given a better MRR bought with one passage lost from the top 5 (what Doc2Dial's candidates do:
    # fused MRR up, passage-hit@5 down), then it is refused for the lost passage
    traded = _rows([(0.5, 1, 1)] * 19 + [(0.2, 1, 1)], [(1.0, 1, 1)] * 19 + [(0.0, 0, 1)])
    decision = embedder_gate_decide(traded, gate)
    assert decision["promote"] is False and decision["passage_hit@5_change"] == -0.05
    assert decision["reason"].startswith("passage-hit@5 drops by 0.0500")
    # and a tolerance of 0.05 lets it through
    assert embedder_gate_decide(traded, EmbedderGate(hit_tolerance=0.05, resamples=2000))["promote"] is True


def test_the_scheduled_check_starts_a_run_when_enough_corrections_are_new(corrections, settings):
    from tuning.embedder_runs import embedder_run_scheduled_check

    settings.TUNING_HOLDOUT_SHARE = HOLDOUT
    # Given six approved corrections and a threshold of seven, then no run starts
    settings.TUNING_EMBEDDER_MIN_NEW_CORRECTIONS = 7
    assert embedder_run_scheduled_check() is None and not EmbedderRun.objects.exists()
    # Given a threshold of six, then a run starts, triggered by the schedule
    settings.TUNING_EMBEDDER_MIN_NEW_CORRECTIONS = 6
    run = embedder_run_scheduled_check()
    assert run is not None and (run.trigger, run.status, run.corrections_count) == ("schedule", "queued", 6)
    # and none while it is in progress, nor after it when no correction is new since its snapshot
    assert embedder_run_scheduled_check() is None
    EmbedderRun.objects.filter(pk=run.pk).update(status="succeeded")
    settings.TUNING_EMBEDDER_MIN_NEW_CORRECTIONS = 1
    assert embedder_run_scheduled_check() is None and EmbedderRun.objects.count() == 1


def test_a_run_snapshots_the_unanswerable_corrections_questions_for_the_abstention_check(corrections):
    # Given one more approved correction that has no evidence chunk (an agent marked it unanswerable)
    conversation = Conversation.objects.create(collection="default")
    message = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, text="")
    Correction.objects.create(
        message=message, reason=Correction.Reason.MISSING_FROM_KB, corrected_answer="We cannot help with that.",
        question="What is the best pizza topping?", history=[{"role": "user", "text": "Hello there"}],
        status=Correction.Status.APPROVED, seeded=True, seed_key="unanswerable", seed_group="dialogue-x")

    # When a run starts, then its question (read with the earlier user question, as retrieval reads it)
    # is snapshotted for the gate, and it is no training or held-out example
    run = embedder_run_start(holdout_share=HOLDOUT, enqueue=False)
    assert run.unanswerable_questions == ["What is the best pizza topping?\nHello there"]
    assert (run.train_count, run.heldout_count, run.corrections_count) == (4, 2, 6)


def test_threshold_map_keeps_a_threshold_where_it_sits_among_the_questions_distances():
    from tuning.embedder_evaluation import threshold_map

    # Given answerable questions at 0.2..0.5 and unrelated ones at 0.7 / 0.8 for the active version, and a
    # candidate whose distances are all half as large (same order)
    served = [0.2, 0.3, 0.4, 0.5, 0.7, 0.8]
    candidate = [d / 2 for d in served]
    # Then 0.62 (60 % of the way from the farthest answerable to the closest unrelated) maps to 0.31
    assert threshold_map(served, candidate, 0.62) == pytest.approx(0.31)
    # and the order of the lists does not matter (each is sorted), only the questions they hold
    assert threshold_map(served[::-1], candidate, 0.62) == pytest.approx(0.31)
    # and outside the served range a threshold keeps its distance to the nearest end
    assert threshold_map(served, candidate, 0.9) == pytest.approx(0.5)
    assert threshold_map(served, candidate, 0.1) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        threshold_map(served, candidate[:3], 0.62)


def test_embedder_examples_skip_curated_answers_recorded_before_snapshots_kept_the_kind(corrections):
    from knowledge.models import Source
    from tuning.embedder_training import embedder_examples

    # Given a training correction whose snapshot (taken before snapshots recorded the source's kind)
    # shows a curated answer first, then the passages its negative came from
    curated = Source.objects.create(collection="default", uri="curated:renewal", kind=Source.Kind.CURATED,
                                    title="How long does a passport renewal take?", status=Source.Status.READY)
    first = corrections[1]
    legacy = {key: value for key, value in first.shown_chunks[0].items() if key != "source_kind"}
    first.shown_chunks = [{**legacy, "chunk_id": 999999, "source_id": curated.pk,
                           "text": "Q: How long does a renewal take? A: Six to eight weeks."}, *first.shown_chunks]
    first.save()

    # When the examples are built
    [example] = [e for e in embedder_examples(corrections, holdout_share=HOLDOUT)["train"]
                 if e.correction_id == first.pk]

    # Then its hard negative is the first passage shown, not the curated answer
    assert example.negative_chunk_id == first.shown_chunks[1]["chunk_id"]
    # and a new snapshot records the kind
    assert first.supporting_chunks[0]["source_kind"] == "file"


def test_rrf_fuse_weighs_each_leg_and_refuses_a_weight_count_that_does_not_match():
    from tuning.embedder_evaluation import rrf_fuse

    # Given a vector leg ranking 1, 2, 3 and a full-text leg ranking 3, 2, 1 (rrf_k 60)
    vector, text = [1, 2, 3], [3, 2, 1]
    # Then with equal weights 1 and 3 tie (1/61 + 1/63), the tie going to the smaller id, and 2 (2/62) follows
    assert rrf_fuse([vector, text], 3, rrf_k=60) == [1, 3, 2]
    # and the unweighted call is the weights-1 call
    assert rrf_fuse([vector, text], 3, rrf_k=60) == rrf_fuse([vector, text], 3, rrf_k=60, weights=[1.0, 1.0])
    # and weighting a leg puts its first chunk first
    assert rrf_fuse([vector, text], 1, rrf_k=60, weights=[2.0, 1.0]) == [1]
    assert rrf_fuse([vector, text], 1, rrf_k=60, weights=[1.0, 2.0]) == [3]
    with pytest.raises(ValueError):
        rrf_fuse([vector, text], 3, weights=[1.0])


def _abstention_rows(answerable: list[tuple[float, float]], unanswerable: list[tuple[float, float]]) -> dict:
    """A comparison carrying per-question (served, candidate) closest distances."""
    return {"rows": [{"query": f"a{i}", "served_distance": s, "candidate_distance": c}
                     for i, (s, c) in enumerate(answerable)],
            "unanswerable_rows": [{"query": f"u{i}", "served_distance": s, "candidate_distance": c}
                                  for i, (s, c) in enumerate(unanswerable)]}


def test_the_abstention_calibration_fits_the_candidates_scale_and_the_gate_checks_its_decisions():
    from tuning.embedder_evaluation import EmbedderGate, abstention_calibrate, embedder_gate_decide

    gate = EmbedderGate(min_mrr_gain=-1.0, hit_tolerance=1.0, abstention_tolerance=0.0, resamples=500)
    clear = _rows([(0.5, 1, 1)] * 20, [(1.0, 1, 1)] * 20)  # a candidate that wins on ranking

    # Given a candidate whose distances are all 0.3 larger: with the active threshold 0.62 it would decline
    # the answerable questions the active version finds at 0.33..0.55 (now 0.63..0.85)
    answerable = [(0.21 + 0.02 * i, 0.51 + 0.02 * i) for i in range(18)]  # served 0.21..0.55
    unanswerable = [(0.70, 1.00), (0.75, 1.05), (0.80, 1.10)]
    comparison = _abstention_rows(answerable, unanswerable)

    # When its threshold is carried over unchanged, then the gate refuses it for the answerable questions it declines
    carried = abstention_calibrate(comparison, served_threshold=0.62, served_follow_up=0.70, fit=False)
    assert (carried["method"], carried["candidate_threshold"]) == ("carried", 0.62)
    assert carried["answerable"]["served"] == {"n": 18, "declined": 0, "share": 0.0}
    assert carried["answerable"]["candidate"] == {"n": 18, "declined": 12, "share": 0.6667}
    decision = embedder_gate_decide(clear, gate, carried)
    assert decision["promote"] is False
    assert decision["reason"].startswith("it declines 12 of 18 held-out answerable questions against the active "
                                         "embedder's 0 (+0.6667; tolerance 0.0;")

    # When it is fitted (21 questions), then its threshold moves by the same 0.3, it declines what the
    # active version declines, and the gate promotes it
    fitted = abstention_calibrate(comparison, served_threshold=0.62, served_follow_up=0.70, min_questions=20)
    assert fitted["method"] == "quantile" and fitted["questions"] == 21
    assert fitted["candidate_threshold"] == pytest.approx(0.92) and fitted["candidate_follow_up"] == pytest.approx(1.0)
    assert fitted["answerable"]["candidate"]["declined"] == 0 and fitted["unanswerable"]["candidate"]["declined"] == 3
    decision = embedder_gate_decide(clear, gate, fitted)
    assert decision["promote"] is True and decision["abstention"] == fitted
    assert "declines 0/18 answerable (active 0) and 3/3 unanswerable (active 3)" in decision["reason"]
    # and the own-words margin keeps its width on the candidate's scale: 0.10 below 0.62 is 0.10 below 0.92
    assert fitted["served_own_margin"] is None and fitted["candidate_own_margin"] is None
    margin = abstention_calibrate(comparison, served_threshold=0.62, served_follow_up=0.70, served_own_margin=0.10)
    assert margin["candidate_own_margin"] == pytest.approx(0.10) and margin["served_own_margin"] == 0.10
    # on a candidate whose distances are half as large, it is half as wide
    halved = _abstention_rows([(s, s / 2) for s, _ in answerable], [(s, s / 2) for s, _ in unanswerable])
    margin = abstention_calibrate(halved, served_threshold=0.62, served_follow_up=0.70, served_own_margin=0.10)
    assert margin["candidate_threshold"] == pytest.approx(0.31) and margin["candidate_own_margin"] == pytest.approx(0.05)
    # and a negative margin (the rule off) stays off
    assert abstention_calibrate(halved, served_threshold=0.62, served_follow_up=0.70,
                                served_own_margin=-1.0)["candidate_own_margin"] == -1.0
    # and with too few questions for a fit, the active version's thresholds are kept
    assert abstention_calibrate(comparison, served_threshold=0.62, served_follow_up=0.70,
                                min_questions=22)["method"] == "carried"

    # Given a candidate that finds the answerable questions as the active one does but brings the
    # unrelated ones as close, then the gate refuses it for the unanswerable questions it no longer declines
    blurred = _abstention_rows([(d, d) for d, _ in answerable], [(0.70, 0.30), (0.75, 0.32), (0.80, 0.34)])
    kept = abstention_calibrate(blurred, served_threshold=0.62, served_follow_up=0.70, fit=False)
    decision = embedder_gate_decide(clear, gate, kept)
    assert decision["promote"] is False
    assert decision["reason"].startswith("it declines 0 of 3 unanswerable questions against the active embedder's 3 "
                                         "(-1.0000; tolerance 0.0;")


def test_the_curated_match_calibration_keeps_the_share_of_question_pairs_that_match():
    from tuning.embedder_evaluation import curated_match_calibrate

    rng = np.random.default_rng(1)
    served = {i: v / np.linalg.norm(v) for i, v in enumerate(rng.normal(size=(40, 8)))}
    # Given a candidate whose questions are the same, then the threshold is unchanged
    same = curated_match_calibrate(served, dict(served), served_threshold=0.25, min_questions=20)
    assert (same["method"], same["questions"], same["pairs"]) == ("quantile", 40, 780)
    assert same["candidate_threshold"] == pytest.approx(0.25, abs=1e-4)

    # Given a candidate that pulls every question towards one direction (all pairs closer; another dimension)
    # and holds one more question than the active version (left out of the fit)
    direction = np.ones(8) / np.sqrt(8)
    candidate = {i: np.concatenate([v + 1.5 * direction, [0.0, 0.0]]) for i, v in served.items()}
    candidate[99] = np.ones(10)
    closer = curated_match_calibrate(served, candidate, served_threshold=0.6, min_questions=20)
    # Then its threshold is smaller, and it matches as many pairs within it as the active version within 0.6
    assert closer["questions"] == 40 and closer["candidate_threshold"] < 0.6
    within = closer["pairs_within"]
    assert within["served"] > 0 and within["candidate"] == within["served"]

    # Given too few questions in both, or the calibration off, then the active threshold is carried with the reason
    few = curated_match_calibrate(served, candidate, served_threshold=0.25, min_questions=41)
    assert (few["method"], few["candidate_threshold"]) == ("carried", 0.25)
    assert few["note"].startswith("40 curated question(s) in both versions, fewer than the 41")
    off = curated_match_calibrate(served, candidate, served_threshold=0.25, fit=False)
    assert (off["method"], off["candidate_threshold"]) == ("carried", 0.25)
    # and a sample of at most max_questions is fitted on
    assert curated_match_calibrate(served, candidate, served_threshold=0.6, max_questions=25)["questions"] == 25


def test_the_stale_sweep_leaves_a_run_whose_switch_holds_its_row(transactional_db, settings):
    import threading

    from django.db import connection, transaction

    # Given a promoting run silent for longer than TUNING_RUN_STALE_S, whose worker holds its row (the
    # switch's one transaction writes no heartbeat until it commits)
    old = timezone.now() - timedelta(seconds=settings.TUNING_RUN_STALE_S + 1)
    run = EmbedderRun.objects.create(status="promoting", base_model_path="/tmp/base", base_model_sha256="0" * 64,
                                     holdout_share=0.2, examples_sha256="0" * 64, heartbeat_at=old)
    locked, release = threading.Event(), threading.Event()

    def switching():
        try:
            with transaction.atomic():
                EmbedderRun.objects.select_for_update().get(pk=run.pk)
                locked.set()
                assert release.wait(60)
        finally:
            connection.close()

    thread = threading.Thread(target=switching)
    thread.start()
    try:
        assert locked.wait(60)
        # When the sweep runs meanwhile, then it leaves the run alone, without waiting for the lock
        assert embedder_runs_fail_stale() == 0
        run.refresh_from_db()
        assert run.status == "promoting"
    finally:
        release.set()
        thread.join(60)
    # When the worker is gone (the row free, still no heartbeat), then the sweep fails it
    assert embedder_runs_fail_stale() == 1
    run.refresh_from_db()
    assert run.status == "failed" and run.error.startswith("the worker stopped reporting during promoting")
