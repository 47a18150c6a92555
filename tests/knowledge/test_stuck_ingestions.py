"""Sources left in parsing/embedding by a worker that died are failed with a reason by the periodic
sweep (``knowledge.stuck_ingestions``, task ``knowledge.fail_stuck_sources``); the ingestion task is
redelivered when its worker process is lost, a bounded number of times."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from knowledge import stuck_ingestions
from knowledge.models import Source
from knowledge.tasks import fail_stuck_sources, ingest_source
from tests.knowledge.conftest import ingest_paths, serving_snapshot
from tests.knowledge.sample_files import RETURNS_MD

pytestmark = pytest.mark.django_db


def source_in(status: str, *, idle_s: float, uri: str) -> Source:
    source = Source.objects.create(uri=uri, title=uri, status=status, progress=40)
    Source.objects.filter(pk=source.pk).update(updated_at=timezone.now() - timedelta(seconds=idle_s))
    return source


def test_sources_without_progress_past_the_timeout_are_failed_with_a_reason(settings):
    # given sources parsing and embedding with no progress for 20 min, and others that must not move
    settings.INGEST_STUCK_S = 900
    parsing = source_in("parsing", idle_s=1200, uri="a.md")
    embedding = source_in("embedding", idle_s=1200, uri="b.md")
    busy = source_in("embedding", idle_s=60, uri="c.md")
    queued = source_in("queued", idle_s=5000, uri="d.md")
    ready = source_in("ready", idle_s=5000, uri="e.md")
    before = {s.pk: (s.status, s.error) for s in Source.objects.filter(pk__in=[busy.pk, queued.pk, ready.pk])}

    # when the periodic sweep runs
    assert fail_stuck_sources() == 2

    # then the stuck ones are failed with the reason, and nothing else changed
    rows = {s.pk: (s.status, s.error, s.progress) for s in Source.objects.all()}
    assert rows[parsing.pk] == ("failed", stuck_ingestions.stuck_reason("parsing", 900), 0)
    assert rows[embedding.pk] == ("failed", stuck_ingestions.stuck_reason("embedding", 900), 0)
    assert rows[embedding.pk][1] == (
        "ingestion stopped during embedding: no progress for 900 s (the worker was probably killed, e.g. out of "
        "memory); the previous version keeps serving. Upload the file again or re-run the ingestion.")
    assert {pk: rows[pk][:2] for pk in before} == before
    # and a second sweep finds nothing
    assert fail_stuck_sources() == 0


def test_the_previous_version_keeps_serving_when_a_re_ingestion_is_failed(kb_folder, settings):
    # given a source ingested and serving, whose re-ingestion then stopped mid-embedding
    settings.INGEST_STUCK_S = 60
    path = kb_folder / "returns.md"
    path.write_text(RETURNS_MD, encoding="utf-8")
    assert ingest_paths([path])["returns.md"].status == "ingested"
    source = Source.objects.get()
    serving = serving_snapshot(source.pk)
    Source.objects.filter(pk=source.pk).update(status="embedding", progress=50,
                                               updated_at=timezone.now() - timedelta(seconds=600))

    assert stuck_ingestions.sources_fail_stuck() == 1

    # then it is failed, and its chunks are the ones that were serving
    assert Source.objects.get().status == "failed"
    assert serving_snapshot(source.pk) == serving


def test_the_sweep_is_on_celery_beat():
    entry = django_settings.CELERY_BEAT_SCHEDULE["knowledge.fail_stuck_sources"]
    assert entry == {"task": "knowledge.fail_stuck_sources", "schedule": django_settings.STUCK_WORK_SWEEP_S}


def test_the_ingestion_task_is_redelivered_when_its_worker_process_is_lost():
    # acks_late alone acknowledges a task whose pool process was killed (it was lost for good)
    assert (ingest_source.acks_late, ingest_source.reject_on_worker_lost) == (True, True)


def test_a_task_delivered_too_often_fails_its_source_instead_of_looping(settings, monkeypatch):
    # given a file whose ingestion killed its worker on every delivery so far
    settings.INGEST_MAX_DELIVERIES = 3
    source = Source.objects.create(uri="poison.pdf", title="poison.pdf", status="embedding")
    calls = []
    monkeypatch.setattr("knowledge.services.document_ingest", lambda *a, **k: calls.append(a))
    task_id = f"test-{source.pk}-{timezone.now().timestamp()}"

    # when it is delivered a fourth time
    for _ in range(3):
        stuck_ingestions.ingest_delivery_count(task_id)
    result = ingest_source.apply(args=[source.pk], task_id=task_id).get()

    # then it is not run again; the source is failed with the reason
    assert calls == []
    source.refresh_from_db()
    assert (source.status, source.error) == (
        "failed", "ingestion was interrupted 3 times (its worker process died each time, e.g. out of memory); "
                  "not retried")
    assert result == {"source_id": source.pk, "status": "failed", "chunks": 0, "error": source.error}
