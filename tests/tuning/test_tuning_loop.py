"""The whole tuning loop in CI time, with a tiny llama model made in the test (random weights, SmolLM2's
tokenizer, written as GGUF) and the real embedding model, Postgres, Redis and Celery worker:
seed → dataset snapshot → LoRA training (transformers + peft on the GGUF) → GGUF adapter export →
parity check in llama-cpp-python → four-arm evaluation through the serving path → gate → promotion
→ the chat pipeline answers with the new version. A failing gate does not promote; a crash mid-run
or a killed worker leaves the active version serving."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from chat import engine as engine_module
from chat.models import Message, ModelVersion
from chat.services import answer_stream, conversation_start, model_version_active
from tests.tuning.tiny_gguf import write_tiny_llama_gguf
from tuning import services
from tuning.fine_tuning import FineTuneError, fine_tune_run_execute, fine_tune_run_start, model_version_rollback
from tuning.models import Correction, FineTuneRun, ModelEvaluation, TrainingDataset

COLLECTION = "tuning-loop"
DEMO = Path(__file__).resolve().parents[2] / "demo" / "knowledge_base"
# (qid, page, question, reference sentence on that page). qids "dN_1": one dialogue per question.
QUESTIONS = [
    ("d01_1", "returns-policy.md", "How long do I have to return something?",
     "You can return unused items in their original packaging within 60 days of delivery for a full refund."),
    ("d02_1", "returns-policy.md", "Can I return gift cards?",
     "Opened fuel canisters, personalised items and gift cards cannot be returned."),
    ("d03_1", "returns-policy.md", "When will I get my refund?",
     "We refund to the original payment method within 5 business days of receiving the return."),
    ("d04_1", "returns-policy.md", "Do returns by mail cost anything?",
     "Returns by mail are free for exchanges; for refunds we deduct 5.95 dollars for the label."),
    ("d05_1", "shipping-policy.md", "How much is express shipping?", "Express shipping costs 19.95 dollars on any order."),
    ("d06_1", "shipping-policy.md", "When is standard shipping free?",
     "Standard shipping is free on orders of 75 dollars or more."),
    ("d07_1", "shipping-policy.md", "How are kayaks delivered?",
     "Kayaks, canoes and paddle boards ship by freight."),
    ("d08_1", "shipping-policy.md", "Where do you ship from?",
     "Tidewater Trail Co. ships from our warehouse in Portland, Oregon."),
    ("d09_1", "about-stores.txt", "Which stores rent gear?",
     "The Portland and Seattle stores rent tents, sleeping bags and kayaks by the day."),
    ("d10_1", "about-stores.txt", "How long do repairs take?", "Most repairs take one week."),
    ("d11_1", "shipping-policy.md", "How long does freight delivery take?",
     "Freight delivery takes 7 to 12 business days and costs a flat 149 dollars."),
    ("d12_1", "returns-policy.md", "Can I return worn shoes?",
     "Worn footwear can be returned within 30 days only if it has a manufacturing defect."),
]
UNANSWERABLE = ["Can you recommend a good pizza place?", "What is the capital of Australia?"]

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf",
                                 tokenizer_gguf_path=settings.LLM_MODEL_PATH)


@pytest.fixture
def loop_settings(settings, tiny_model, tmp_path):
    settings.LLM_MODEL_PATH = str(tiny_model)
    settings.LLM_MAX_TOKENS = 16
    settings.TUNING_DIR = str(tmp_path / "tuning")
    # Published adapters and this "host"'s copies of them, out of the project's data folder.
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "artifacts")}}}
    settings.MODEL_CACHE_DIR = str(tmp_path / "model-cache")
    settings.TUNING_EPOCHS = 3
    settings.TUNING_BATCH_SIZE = 2
    settings.TUNING_LEARNING_RATE = 3e-3
    settings.TUNING_MAX_SEQ_TOKENS = 384
    settings.TUNING_HOLDOUT_SHARE = 0.3
    # The loop's mechanics are under test here (the gate's rules are in test_gate.py): a random tiny
    # model cannot be expected to improve, so the promoting test accepts any candidate that answers.
    settings.TUNING_GATE_MIN_F1_GAIN = -1.0
    settings.TUNING_GATE_CITATION_TOLERANCE = 1.0
    settings.TUNING_GATE_CITATION_PRECISION_TOLERANCE = 1.0
    settings.TUNING_GATE_ABSTENTION_TOLERANCE = 1.0
    settings.TUNING_GATE_FALSE_ABSTENTION_TOLERANCE = 1.0
    previous = engine_module.set_engine(None)
    yield settings
    engine = engine_module.set_engine(previous)
    if engine is not None:
        engine.shutdown()


@pytest.fixture
def seeded(loop_settings, embedding_model, tmp_path):
    """The demo pages ingested into ``tuning-loop`` and the questions seeded as approved corrections;
    returns the question file."""
    from knowledge.models import Source
    from knowledge.services import document_ingest, sources_register_paths

    registered = sources_register_paths([DEMO / p for p in ("returns-policy.md", "shipping-policy.md", "about-stores.txt")],
                                        collection=COLLECTION, enqueue=False, force=True)
    for source in registered.queued:
        assert document_ingest(source.pk).status == "ingested"
    rows = []
    for qid, page, question, sentence in QUESTIONS:
        source = Source.objects.get(collection=COLLECTION, uri=str(DEMO / page))
        found = re.search(r"\s+".join(map(re.escape, sentence.split())), source.text)
        assert found, sentence
        rows.append({"qid": qid, "question": question, "history": [], "reference_answer": sentence,
                     "answer_start": found.start(), "answer_end": found.end(), "is_first_turn": True, "gold_file": page})
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unanswerable = tmp_path / "unanswerable.txt"
    unanswerable.write_text("# out-of-scope questions, one per line\n\n" + "\n".join(UNANSWERABLE) + "\n")
    call_command("seed_training_data", questions=str(questions), collection=COLLECTION, docs_root=str(DEMO),
                 unanswerable=str(unanswerable))
    return questions


def test_seeding_builds_approved_corrections_with_real_retrieval(seeded):
    # given 12 questions with gold spans and 2 unanswerable questions (in a file with a comment and a blank line)
    corrections = list(Correction.objects.filter(seeded=True).order_by("id"))
    # then each became an approved, seeded correction with the retrieved chunks and its gold chunk
    assert len(corrections) == 14
    answerable = [c for c in corrections if c.supporting_chunks]
    assert len(answerable) == 12
    for correction, (qid, page, question, sentence) in zip(answerable, QUESTIONS):
        assert (correction.status, correction.seeded, correction.author_id, correction.reviewer_id) == ("approved", True, None, None)
        assert correction.question == question and correction.corrected_answer == sentence
        assert correction.seed_key == f"{COLLECTION}:{qid}" and correction.seed_group == qid.rsplit("_", 1)[0]
        assert any(sentence[:30] in " ".join(s["text"].split()) for s in correction.supporting_chunks)
        assert len(correction.shown_chunks) == settings.LLM_PROMPT_SOURCES
        # and, like an approved agent correction, a curated answer of the collection citing its gold chunk
        assert (correction.curated_answer.key, correction.curated_answer.source.collection) == (
            f"correction:{correction.pk}", COLLECTION)
    abstain = [c for c in corrections if not c.supporting_chunks]
    assert [c.reason for c in abstain] == ["missing_from_kb", "missing_from_kb"]
    assert [(c.curated_answer_id, c.curation_note) for c in abstain] == [(None, services.NOT_CURATED_NO_EVIDENCE)] * 2
    # seeding again adds nothing
    before = Correction.objects.count()
    call_command("seed_training_data", questions=str(seeded), collection=COLLECTION, docs_root=str(DEMO))
    assert Correction.objects.count() == before


def test_whole_loop_trains_exports_checks_evaluates_promotes_and_serves(seeded, loop_settings, celery_worker_real):
    base = model_version_active()
    assert base.adapter_path == "" and base.base_model_path == settings.LLM_MODEL_PATH
    # when a run is started (as the "fine-tune now" button does) and a real worker executes it (the
    # tuning queue routed to the test worker's private queue)
    from config.celery import app

    loop_settings.TUNING_QUEUE = app.conf.task_default_queue
    run = fine_tune_run_start(trigger="manual")
    deadline = timezone.now() + timedelta(minutes=10)
    while FineTuneRun.objects.get(pk=run.pk).status in FineTuneRun.IN_PROGRESS and timezone.now() < deadline:
        time.sleep(1)
    dataset = run.dataset
    assert (dataset.version, dataset.train_count + dataset.heldout_count) == (1, 14)
    assert dataset.train_count > 0 and dataset.heldout_count > 0
    run.refresh_from_db()
    # then it trained, exported, passed parity, evaluated four arms and was promoted
    assert run.status == "promoted", run.error
    steps = -(-dataset.train_count // 2) * 3
    assert [p["step"] for p in run.loss_curve] == list(range(1, steps + 1))
    assert Path(run.adapter_path).is_file() and len(run.adapter_sha256) == 64
    assert run.parity["passed"] is True and run.parity["prompts"] == 3
    assert run.base_model_sha256 == base.base_model_sha256 and run.duration_s > 0 and run.peak_rss_mb > 0
    evaluation = ModelEvaluation.objects.get(run=run)
    assert sorted(evaluation.arms) == sorted(["base+retrieval", "candidate", "candidate+retrieval", "active+retrieval"])
    assert evaluation.arms["active+retrieval"]["same_as"] == "base+retrieval"  # the base was active
    assert evaluation.arms["candidate"]["retrieval"] is False
    assert all(evaluation.arms[a]["questions"] == dataset.heldout_count for a in evaluation.arms)
    assert "<svg" in evaluation.report_html and "Promote" in evaluation.report_html
    assert run.decision["promote"] is True and run.decision["evaluation_id"] == evaluation.pk
    candidate = ModelVersion.objects.get(is_active=True)
    assert candidate == run.model_version
    # and the version serves the adapter published to the artifact storage, not the run's scratch file
    assert (candidate.adapter_path, candidate.adapter_sha256) == (
        f"artifacts:models/{run.adapter_sha256}/adapter.gguf", run.adapter_sha256)
    cached = Path(loop_settings.MODEL_CACHE_DIR) / run.adapter_sha256 / "adapter.gguf"

    # and the chat pipeline now answers with the new version, without a restart (the model is asked:
    # no source sentence is quoted before it)
    loop_settings.ANSWER_QUOTE_MIN_RELEVANCE = 2.0
    # (the questions below were seeded, so they are curated answers, which are served without the
    # model; no question may match one here)
    loop_settings.CURATED_MATCH_MAX_DISTANCE = -1.0
    conversation = conversation_start(collection=COLLECTION)
    events = list(answer_stream(conversation.pk, "How much is express shipping?"))
    assert events[-1].type == "chat.done"
    message = Message.objects.get(pk=events[-1].data["message_id"])
    assert message.model_version == candidate
    assert engine_module.get_engine().current_key == engine_module.ModelKey(candidate.base_model_path, str(cached))

    # and rolling back to the base is one call; the next answer comes from the base
    model_version_rollback(base.pk)
    events = list(answer_stream(conversation.pk, "When is standard shipping free?"))
    assert Message.objects.get(pk=events[-1].data["message_id"]).model_version == base


def test_a_failing_gate_keeps_the_active_model(seeded, loop_settings):
    loop_settings.TUNING_GATE_MIN_F1_GAIN = 1.0  # no candidate can gain more than 1.0 token-F1
    base = model_version_active()
    run = fine_tune_run_execute(fine_tune_run_start(enqueue=False).pk)
    assert run.status == "succeeded" and run.decision["promote"] is False
    assert "so the gain may be noise" in run.decision["reason"]
    interval = run.decision["f1_gain_interval"]
    assert interval["questions"] == run.dataset.examples.filter(split="heldout", has_gold=True).count()
    assert interval["low"] <= interval["mean"] <= interval["high"]
    evaluation = ModelEvaluation.objects.get(run=run)
    assert evaluation.decision["f1_gain_interval"] == interval
    assert "interval [" in evaluation.report_html and "paired bootstrap" in evaluation.report_html
    assert ModelVersion.objects.get(is_active=True) == base
    assert run.model_version is not None and run.model_version.is_active is False


def test_a_crash_mid_run_leaves_the_active_version_serving(seeded, monkeypatch):
    base = model_version_active()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("tuning.gguf_lora.lora_adapter_export", disk_full)
    run = fine_tune_run_execute(fine_tune_run_start(enqueue=False).pk)
    assert run.status == "failed" and run.error == "export failed: No space left on device"
    assert len(run.loss_curve) > 0 and run.model_version is None
    assert ModelVersion.objects.get(is_active=True) == base
    # running the task again does nothing (only a queued run is claimed)
    assert fine_tune_run_execute(run.pk).status == "failed"


def test_a_killed_worker_is_detected_and_a_new_run_may_start(seeded):
    base = model_version_active()
    dataset = TrainingDataset.objects.first() or fine_tune_run_start(enqueue=False).dataset
    FineTuneRun.objects.filter(status__in=FineTuneRun.IN_PROGRESS).delete()
    killed = FineTuneRun.objects.create(dataset=dataset, status="training", base_model_path=base.base_model_path,
                                        base_model_sha256=base.base_model_sha256,
                                        heartbeat_at=timezone.now() - timedelta(hours=2))
    # while it looked alive, a second run could not start
    FineTuneRun.objects.filter(pk=killed.pk).update(heartbeat_at=timezone.now())
    with pytest.raises(FineTuneError, match="already in progress"):
        fine_tune_run_start(enqueue=False)
    # once its heartbeat is older than TUNING_RUN_STALE_S it is marked failed and a new run starts
    FineTuneRun.objects.filter(pk=killed.pk).update(heartbeat_at=timezone.now() - timedelta(hours=2))
    new = fine_tune_run_start(enqueue=False)
    killed.refresh_from_db()
    assert killed.status == "failed" and killed.error.startswith("the worker stopped reporting during training")
    assert new.status == "queued" and ModelVersion.objects.get(is_active=True) == base
