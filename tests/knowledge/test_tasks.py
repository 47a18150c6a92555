"""Celery ingestion tasks run by a real worker (threads, same process) on the real Redis broker.

Tasks are enqueued by the services with ``transaction.on_commit``, so these tests commit
(``transaction=True``). Completion is observed through Celery's ``task_postrun`` signal, which the
worker sends with each task's return value.
"""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager

import pytest
from celery.signals import task_postrun

from knowledge import services
from knowledge.services import ingestion
from knowledge.models import Chunk, Source
from knowledge.tasks import ingest_source, ingest_sources
from tests.knowledge.conftest import serving_snapshot
from tests.knowledge.sample_files import CARE_PDF_PAGES, FAQ_CSV, RETURNS_MD, SCRIPTS_ONLY_HTML, pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)


class FinishedTasks:
    """Per-source return values of ``knowledge.ingest_source`` and ``knowledge.ingest_sources`` runs
    (a batch contributes one entry per source), in the order the worker finished them."""

    def __init__(self):
        self.results: list[tuple[str, dict | Exception]] = []
        self.task_names: list[str] = []
        self.threads: set[str] = set()
        self._changed = threading.Condition()

    def record(self, sender=None, task=None, retval=None, state=None, **kwargs):
        if task is not None and task.name in ("knowledge.ingest_source", "knowledge.ingest_sources"):
            with self._changed:
                self.threads.add(threading.current_thread().name)
                self.task_names.append(task.name)
                per_source = retval if isinstance(retval, list) else [retval]
                self.results.extend((state, r) for r in per_source)
                self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 120) -> list[tuple[str, dict | Exception]]:
        """Block until ``count`` runs have finished; fails after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.results) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {len(self.results)} of {count} ingestion tasks finished"
                self._changed.wait(remaining)
            return list(self.results)


@contextmanager
def _finished_tasks():
    tasks = FinishedTasks()
    task_postrun.connect(tasks.record, weak=False)
    try:
        yield tasks
    finally:
        task_postrun.disconnect(tasks.record)


@pytest.fixture
def finished(celery_worker_real, embedding_model):
    with _finished_tasks() as tasks:
        yield tasks


@pytest.fixture
def finished_on_two_threads(celery_worker_real_concurrent, embedding_model):
    """``finished`` for a worker running two tasks at once."""
    with _finished_tasks() as tasks:
        yield tasks


def test_folder_registered_for_ingestion_is_ingested_by_the_worker(finished, kb_folder):
    # given a folder with two good files and two bad ones
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    (kb_folder / "store_faq.csv").write_text(FAQ_CSV)
    (kb_folder / "empty.md").write_bytes(b"")
    (kb_folder / "app.html").write_text(SCRIPTS_ONLY_HTML)
    # when it is registered (which queues one batch task for the four files when its transaction commits)
    registered = services.sources_register_paths([kb_folder], collection="help")
    assert len(registered.queued) == 4
    # then the worker ingests each: the good files end ready, the bad ones failed with their reason
    results = finished.wait_for(4)
    by_id = {s.pk: s.uri.rsplit("/", 1)[1] for s in registered.queued}
    assert sorted((by_id[r["source_id"]], state, r["status"], r["chunks"], r["error"]) for state, r in results) == [
        ("app.html", "SUCCESS", "failed", 0,
         "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)"),
        ("empty.md", "SUCCESS", "failed", 0, "the file is empty"),
        ("returns.md", "SUCCESS", "ingested", 3, ""),
        ("store_faq.csv", "SUCCESS", "ingested", 2, ""),
    ]
    assert sorted((s.uri.rsplit("/", 1)[1], s.status, s.progress, s.chunk_count) for s in Source.objects.all()) == [
        ("app.html", "failed", 0, 0),
        ("empty.md", "failed", 0, 0),
        ("returns.md", "ready", 100, 3),
        ("store_faq.csv", "ready", 100, 2),
    ]
    assert Chunk.objects.count() == 5
    assert finished.task_names == ["knowledge.ingest_sources"]
    # and the tasks ran on the worker's threads, not in this one
    assert finished.threads and threading.current_thread().name not in finished.threads


def test_admin_upload_of_several_files_is_ingested_by_one_batch_task_and_a_corrupt_file_fails_alone(
        finished, admin_client, media_root):
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.urls import reverse

    # given a serving PDF, uploaded alone (one file: its own knowledge.ingest_source task)
    admin_client.post(reverse("admin:knowledge_source_upload"), {
        "files": [SimpleUploadedFile("care.pdf", pdf_bytes(CARE_PDF_PAGES), content_type="application/pdf")],
        "collection": "default"})
    [(_, first)] = finished.wait_for(1)
    assert (finished.task_names, first["status"]) == (["knowledge.ingest_source"], "ingested")
    care = Source.objects.get(uri="upload:care.pdf")
    before = serving_snapshot(care.pk)
    # when the admin's upload page gets two good files and a corrupt version of that PDF together
    response = admin_client.post(reverse("admin:knowledge_source_upload"), {"files": [
        SimpleUploadedFile("returns.md", RETURNS_MD.encode(), content_type="text/markdown"),
        SimpleUploadedFile("store_faq.csv", FAQ_CSV.encode(), content_type="text/csv"),
        SimpleUploadedFile("care.pdf", pdf_bytes(CARE_PDF_PAGES)[:60], content_type="application/pdf"),
    ], "collection": "default"})
    assert response.status_code == 302
    # then one knowledge.ingest_sources task ingested the three together (their chunks embedded in one
    # round), not one task per file
    results = finished.wait_for(4)
    assert finished.task_names == ["knowledge.ingest_source", "knowledge.ingest_sources"]
    uris = dict(Source.objects.values_list("pk", "uri"))
    reason = "corrupt or unreadable PDF (Stream has ended unexpectedly)"
    assert [(uris[r["source_id"]], state, r["status"], r["chunks"], r["error"]) for state, r in results[1:]] == [
        ("upload:returns.md", "SUCCESS", "ingested", 3, ""),
        ("upload:store_faq.csv", "SUCCESS", "ingested", 2, ""),
        ("upload:care.pdf", "SUCCESS", "failed", 0, reason),
    ]
    # and the admin's list shows the good files ready and the corrupt one failed with its reason
    assert sorted((s.uri, s.status, s.progress, s.chunk_count, s.error, s.pending_file.name)
                  for s in Source.objects.all()) == [
        ("upload:care.pdf", "failed", 0, before["chunk_count"], reason, ""),
        ("upload:returns.md", "ready", 100, 3, "", ""),
        ("upload:store_faq.csv", "ready", 100, 2, "", ""),
    ]
    assert reason in admin_client.get(reverse("admin:knowledge_source_changelist")).content.decode()
    # and the PDF's serving version is exactly what it was; no uploaded file is left behind
    assert serving_snapshot(care.pk) == before
    assert [path for path in media_root.rglob("*") if path.is_file()] == []


def test_ingestion_task_is_safe_to_run_twice(finished, kb_folder):
    # given a file registered and ingested by the worker
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    services.sources_register_paths([kb_folder])
    [(_, first)] = finished.wait_for(1)
    source = Source.objects.get()
    before = serving_snapshot(source.pk)
    # when the same task is delivered twice more
    ingest_source.delay(source.pk)
    ingest_source.delay(source.pk)
    results = finished.wait_for(3)
    # then the first run ingested it, the repeats found it unchanged, and its chunks are untouched
    assert [state for state, _ in results] == ["SUCCESS"] * 3
    assert [r for _, r in results] == [
        {"source_id": source.pk, "status": "ingested", "chunks": 3, "error": ""},
        {"source_id": source.pk, "status": "unchanged", "chunks": 3, "error": ""},
        {"source_id": source.pk, "status": "unchanged", "chunks": 3, "error": ""},
    ]
    assert Source.objects.get().status == "ready"
    assert serving_snapshot(source.pk) == before


def test_uploaded_file_task_run_twice_stays_ready(finished):
    # given an uploaded FAQ sheet (queued on commit) and the same task delivered again
    source = services.source_upload(filename="store_faq.csv", data=FAQ_CSV.encode())
    finished.wait_for(1)
    before = serving_snapshot(source.pk)
    ingest_source.delay(source.pk)
    results = finished.wait_for(2)
    # then the repeat finds nothing pending and leaves the source ready and untouched
    assert [r["status"] for _, r in results] == ["ingested", "unchanged"]
    assert Source.objects.get().status == "ready"
    assert serving_snapshot(source.pk) == before


def test_task_for_a_deleted_source_reports_missing(finished):
    # given a source deleted after its task was queued
    source = services.source_upload(filename="notes.md", data=RETURNS_MD.encode())
    finished.wait_for(1)
    source_id = source.pk
    services.source_delete(source)
    # when its task runs again
    ingest_source.delay(source_id)
    results = finished.wait_for(2)
    # then it reports the source missing and creates nothing
    assert results[1] == ("SUCCESS", {"source_id": source_id, "status": "missing", "chunks": 0, "error": ""})
    assert (Source.objects.count(), Chunk.objects.count()) == (0, 0)


def test_unexpected_error_marks_the_source_failed_and_keeps_what_was_serving(kb_folder, monkeypatch):
    # given a serving source
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    source = services.sources_register_paths([kb_folder], enqueue=False).queued[0]
    services.document_ingest(source.pk)
    before = serving_snapshot(source.pk)

    # when ingestion breaks in an unforeseen way (the task is called in this process)
    def broken(source_id, *, force=False):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(services, "document_ingest", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ingest_source(source.pk)
    # then the source is failed with the error's text and its serving version is untouched
    source.refresh_from_db()
    assert (source.status, source.error) == ("failed", "internal error during ingestion: RuntimeError: disk on fire")
    assert serving_snapshot(source.pk) == before


# --- a file re-uploaded while its previous version is being ingested --------------------------------

RETURNS_V2_MD = RETURNS_MD.replace("30 days", "60 days")


@pytest.mark.parametrize("order", ["newer-finishes-first", "older-finishes-first"])
def test_reupload_during_ingestion_ends_with_the_new_version_serving(order, finished_on_two_threads, media_root,
                                                                      monkeypatch):
    """Two ingestions of one source overlap on a worker running two tasks at once. The interleaving
    is made deterministic with gates: v1's ingestion is held while it embeds; v2 is uploaded then
    (its task runs on the other thread); with "older-finishes-first" v2's task also waits until v1's
    has returned, so v1's ingestion ends while v2 is still pending."""
    v1_embedding, release_v1, v1_returned = threading.Event(), threading.Event(), threading.Event()
    real_embed, real_ingest = ingestion._embed_with_progress, services.document_ingest

    def embed(model, texts, report):
        if any("30 days" in text for text in texts):  # v1's passages only
            v1_embedding.set()
            assert release_v1.wait(60), "v1's ingestion was never released"
        return real_embed(model, texts, report)

    calls = iter(["v1", "v2"])  # v2 is uploaded only once v1's ingestion is embedding

    def ingest(source_id, *, force=False):
        version = next(calls)
        if version == "v2" and order == "older-finishes-first":
            assert v1_returned.wait(60), "v1's ingestion never returned"
        try:
            return real_ingest(source_id, force=force)
        finally:
            if version == "v1":
                v1_returned.set()

    monkeypatch.setattr(ingestion, "_embed_with_progress", embed)
    monkeypatch.setattr(services, "document_ingest", ingest)

    # given v1 uploaded, its ingestion under way on one worker thread
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    assert v1_embedding.wait(60), "v1's ingestion did not reach embedding"
    # when v2 is uploaded under the same name (its task goes to the other thread)
    services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
    if order == "newer-finishes-first":
        [(_, first)] = finished_on_two_threads.wait_for(1)
        assert first["status"] == "ingested"
    release_v1.set()
    results = finished_on_two_threads.wait_for(2)

    # then v1's ingestion stopped without writing and v2's was ingested
    expected = ["ingested", "superseded"] if order == "newer-finishes-first" else ["superseded", "ingested"]
    assert [(state, r["status"]) for state, r in results] == [("SUCCESS", status) for status in expected]
    assert len(finished_on_two_threads.threads) == 2
    # and the source serves v2, ready, with its pending file deleted and no file left behind
    source.refresh_from_db()
    assert (source.status, source.progress, source.error, source.pending_file.name, source.pending_version) == (
        "ready", 100, "", "", 2)
    assert source.content_hash == hashlib.sha256(RETURNS_V2_MD.encode()).hexdigest()
    assert list(Chunk.objects.filter(source=source).order_by("ordinal").values_list("text", flat=True)) == [
        "You can return any item within 60 days of delivery.",
        "Refunds go back to the original payment method within 5 business days.\n\n- The item must be unused\n"
        "- Keep the receipt",
        "Exchanges for another size are free.",
    ]
    assert [path for path in media_root.rglob("*") if path.is_file()] == []


def test_embedding_model_error_in_a_batch_task_fails_its_unfinished_sources_and_keeps_what_was_serving(
        kb_folder, monkeypatch):
    # given two serving files, one changed since and one new file, and one unchanged file
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    (kb_folder / "faq.csv").write_text(FAQ_CSV)
    first = services.sources_register_paths([kb_folder], enqueue=False).queued
    services.documents_ingest([s.pk for s in first])
    faq, returns = sorted(first, key=lambda s: s.uri)
    before = serving_snapshot(returns.pk)
    (kb_folder / "returns.md").write_text(RETURNS_MD + "\nOne more line.\n")
    (kb_folder / "new.md").write_text("# New\n\nA new page.\n")
    new = [s for s in services.sources_register_paths([kb_folder], enqueue=False).queued if s.pk != returns.pk][0]

    # when the embedding model breaks while the batch task runs (called in this process)
    def broken(model, texts, report):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ingestion, "_embed_with_progress", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        ingest_sources([faq.pk, returns.pk, new.pk])
    # then the sources it was ingesting are failed with the error's text, the unchanged one is ready,
    # and the changed one still serves its previous version
    reason = "internal error during ingestion: RuntimeError: out of memory"
    states = {s.pk: (s.status, s.error) for s in Source.objects.all()}
    assert states == {faq.pk: ("ready", ""), returns.pk: ("failed", reason), new.pk: ("failed", reason)}
    assert serving_snapshot(returns.pk) == before
    assert Chunk.objects.filter(source=new.pk).count() == 0


def test_a_redelivered_batch_task_requeues_each_unfinished_source_as_its_own_task(kb_folder, monkeypatch):
    # given a batch of three sources whose worker died mid-batch: one was finished, two were not
    from django.utils import timezone

    from knowledge import stuck_ingestions

    (kb_folder / "returns.md").write_text(RETURNS_MD)
    (kb_folder / "faq.csv").write_text(FAQ_CSV)
    (kb_folder / "poison.md").write_text("# Poison\n\nKills its worker.\n")
    faq, poison, returns = sorted(services.sources_register_paths([kb_folder], enqueue=False).queued,
                                  key=lambda s: s.uri)
    services.document_ingest(faq.pk)
    Source.objects.filter(pk=poison.pk).update(status="embedding", progress=40)
    sent, ran = [], []
    monkeypatch.setattr(ingest_source, "delay", lambda pk, force=False: sent.append((pk, force)))
    monkeypatch.setattr(services, "documents_ingest", lambda *a, **k: ran.append(a))
    task_id = f"test-batch-{faq.pk}-{timezone.now().timestamp()}"
    stuck_ingestions.ingest_delivery_count(task_id)
    # when the task is delivered again
    result = ingest_sources.apply(args=[[faq.pk, poison.pk, returns.pk]], kwargs={"force": True}, task_id=task_id).get()
    # then the batch is not run again: each unfinished source gets its own task (which fails alone
    # after its own deliveries if it kills its worker), the finished one is left alone
    assert ran == []
    assert sent == [(poison.pk, True), (returns.pk, True)]
    assert result == [
        {"source_id": faq.pk, "status": "already finished", "chunks": 0, "error": ""},
        {"source_id": poison.pk, "status": "requeued", "chunks": 0, "error": ""},
        {"source_id": returns.pk, "status": "requeued", "chunks": 0, "error": ""},
    ]
    assert Source.objects.get(pk=faq.pk).status == "ready"
