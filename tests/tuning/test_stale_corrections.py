"""Stale corrections after the knowledge base changes: the periodic Celery task (run by a real worker
on the real Redis broker, scheduled by django-celery-beat), the re-check before a review, and the rule
that the knowledge base never imports tuning or chat.

Sources here are real files ingested for real (parser, chunker, embedding model, Postgres).
"""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import pytest
from celery.signals import task_postrun

from chat.models import Conversation, Message
from knowledge import services as knowledge_services
from tuning import services
from tuning.models import Correction

ROOT = Path(__file__).resolve().parents[2]
RETURNS_V1 = "# Returns\n\nReturns are free within 30 days of delivery.\n"
RETURNS_V2 = "# Returns\n\nReturns are free within 14 days of delivery.\n"
SHIPPING = "# Shipping\n\nWe ship to Canada and the United States.\n"
WARRANTY = "# Warranty\n\nTents carry a two-year warranty.\n"


def ingest(path: Path) -> int:
    """Register and ingest ``path`` in this process; returns the source id."""
    (source,) = knowledge_services.sources_register_paths([path], enqueue=False).queued
    assert knowledge_services.document_ingest(source.pk).status == "ingested"
    return source.pk


def answer_citing(source_id: int) -> Message:
    """An assistant answer whose retrieval trace holds the first chunk of ``source_id``."""
    from knowledge.models import Chunk

    chunk = Chunk.objects.filter(source_id=source_id).order_by("ordinal").first()
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="user", text="A question?")
    return Message.objects.create(
        conversation=conversation, role="assistant", text="An answer [1].",
        retrieval=[{"chunk_id": chunk.pk, "source_id": source_id, "score": 0.03, "vector_distance": 0.2, "text_rank": None}],
    )


@pytest.fixture
def three_sources(tmp_path, embedding_model, db) -> dict[str, Path | int]:
    """Three markdown files ingested for real: returns (to be changed), shipping (to be deleted),
    warranty (left alone)."""
    folder = tmp_path / "kb"
    folder.mkdir()
    files = {"returns": folder / "returns.md", "shipping": folder / "shipping.md", "warranty": folder / "warranty.md"}
    files["returns"].write_text(RETURNS_V1)
    files["shipping"].write_text(SHIPPING)
    files["warranty"].write_text(WARRANTY)
    return {**{f"{name}_file": path for name, path in files.items()}, **{name: ingest(path) for name, path in files.items()}}


def correct(message: Message, author, reviewer=None) -> Correction:
    correction = services.correction_create(message.pk, author=author, corrected_answer="Corrected [1].", reason="wrong_fact")
    if reviewer is not None:
        services.correction_review(correction.pk, reviewer=reviewer, approve=True)
    return correction


class FinishedTasks:
    """Return values of ``tuning.flag_stale_corrections`` runs, as the worker finishes them."""

    def __init__(self):
        self.results: list[tuple[str, object]] = []
        self._changed = threading.Condition()

    def record(self, sender=None, task=None, retval=None, state=None, **kwargs):
        if task is not None and task.name == "tuning.flag_stale_corrections":
            with self._changed:
                self.results.append((state, retval))
                self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 60) -> list[tuple[str, object]]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.results) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {len(self.results)} of {count} runs finished"
                self._changed.wait(remaining)
            return list(self.results)


@pytest.mark.django_db(transaction=True)
def test_the_periodic_task_flags_corrections_whose_source_was_re_ingested_or_deleted(
        three_sources, celery_worker_real, agent, agent2):
    from config.celery import app
    from knowledge.models import Source

    # given approved corrections citing each source, and a pending one citing the changed source
    on_returns = correct(answer_citing(three_sources["returns"]), agent, agent2)
    pending_on_returns = correct(answer_citing(three_sources["returns"]), agent)
    on_shipping = correct(answer_citing(three_sources["shipping"]), agent, agent2)
    on_warranty = correct(answer_citing(three_sources["warranty"]), agent, agent2)
    # when the returns file changes and is re-ingested, and the shipping source is deleted
    three_sources["returns_file"].write_text(RETURNS_V2)
    assert knowledge_services.document_ingest(three_sources["returns"]).status == "ingested"
    knowledge_services.source_delete(Source.objects.get(pk=three_sources["shipping"]))
    # then the knowledge base did not touch the corrections
    assert Correction.objects.filter(stale=True).count() == 0
    # when beat's task runs on the worker (sent by name, as beat sends it)
    finished = FinishedTasks()
    task_postrun.connect(finished.record, weak=False)
    try:
        app.send_task("tuning.flag_stale_corrections", queue=app.conf.task_default_queue)
        first = finished.wait_for(1)
        app.send_task("tuning.flag_stale_corrections", queue=app.conf.task_default_queue)
        second = finished.wait_for(2)[1:]
    finally:
        task_postrun.disconnect(finished.record)
    # then the three corrections citing the changed or deleted source are flagged, with the reason;
    # a second run flags nothing more
    assert first == [("SUCCESS", 3)]
    assert second == [("SUCCESS", 0)]
    flags = {c.pk: (c.stale, c.stale_reason, c.status) for c in Correction.objects.all()}
    assert flags == {
        on_returns.pk: (True, f"source {three_sources['returns']} changed", "approved"),
        pending_on_returns.pk: (True, f"source {three_sources['returns']} changed", "pending"),
        on_shipping.pk: (True, f"source {three_sources['shipping']} was deleted", "approved"),
        on_warranty.pk: (False, "", "approved"),
    }


@pytest.mark.django_db(transaction=True)  # the scheduler closes stale database connections
def test_beat_schedules_the_task_in_django_celery_beats_tables():
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import DatabaseScheduler

    from config.celery import app

    # when beat's database scheduler starts with the project's settings
    DatabaseScheduler(app=app)
    # then the stale check is a periodic task of the admin, every 600 s
    task = PeriodicTask.objects.get(name="tuning.flag_stale_corrections")
    assert (task.task, task.enabled, task.interval.every, task.interval.period) == (
        "tuning.flag_stale_corrections", True, 600, "seconds")


@pytest.mark.django_db
def test_approving_re_checks_staleness_before_the_periodic_task_has_run(three_sources, agent, agent2):
    # given a pending correction citing the returns source
    correction = correct(answer_citing(three_sources["returns"]), agent)
    # when the returns file changes and is re-ingested, and a second agent approves at once
    three_sources["returns_file"].write_text(RETURNS_V2)
    assert knowledge_services.document_ingest(three_sources["returns"]).status == "ingested"
    with pytest.raises(services.CorrectionError, match="stale"):
        services.correction_review(correction.pk, reviewer=agent2, approve=True)
    # then it is flagged stale and still pending, unreviewed
    correction.refresh_from_db()
    assert (correction.status, correction.reviewer_id, correction.reviewed_at, correction.stale, correction.stale_reason) == (
        "pending", None, None, True, f"source {three_sources['returns']} changed")
    # and it can still be rejected
    rejected = services.correction_review(correction.pk, reviewer=agent2, approve=False, note="outdated")
    assert (rejected.status, rejected.reviewer_id, rejected.review_note) == ("rejected", agent2.pk, "outdated")


@pytest.mark.django_db
def test_approving_an_unchanged_correction_does_not_flag_it(three_sources, agent, agent2):
    correction = correct(answer_citing(three_sources["warranty"]), agent)
    approved = services.correction_review(correction.pk, reviewer=agent2, approve=True)
    assert (approved.status, approved.stale, approved.stale_reason) == ("approved", False, "")


def test_the_knowledge_base_imports_neither_tuning_nor_chat():
    # dependencies run tuning -> chat -> knowledge: knowledge code names neither app
    offenders = []
    for path in sorted((ROOT / "knowledge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("tuning", "chat")]
    assert offenders == []
