"""Celery tasks of the knowledge base: thin wrappers around ``knowledge.services``.

``ingest_source`` ingests one source (an upload, a product); ``ingest_sources`` ingests many (a
registered folder, a re-ingest of several sources), embedding their chunks together
(``services.documents_ingest``). Both are ``acks_late`` with ``reject_on_worker_lost``: when their
worker's pool process dies mid-ingestion (killed, out of memory) the message goes back to the queue
and another delivery re-runs it (ingestion is idempotent); ``ingest_source`` at most
``INGEST_MAX_DELIVERIES`` times, while a redelivered ``ingest_sources`` splits into one
``ingest_source`` per unfinished source, so a file that kills its worker fails alone. Without
``reject_on_worker_lost`` Celery acknowledges such a task as failed and it is lost, leaving its
sources in ``embedding`` for ever. ``fail_stuck_sources`` (Celery beat) fails what is still stuck
(``knowledge.stuck_ingestions``). ``activate_embedding_version`` runs a promotion or rollback of the
embedding model that an admin (or anything else answering a request) queued: minutes at 100k chunks.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from knowledge import services, stuck_ingestions


@shared_task(name="knowledge.ingest_source", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_source(self, source_id: int, force: bool = False) -> dict:
    """Ingest source ``source_id`` (see ``services.document_ingest``); safe to run twice.

    An unexpected error marks the source failed with the error's text and is re-raised for the
    worker's log; the serving chunks stay as they were. A delivery past ``INGEST_MAX_DELIVERIES``
    (the worker process died during each earlier one) fails the source instead of running again.
    """
    deliveries = stuck_ingestions.ingest_delivery_count(self.request.id)
    if deliveries > settings.INGEST_MAX_DELIVERIES:
        reason = (f"ingestion was interrupted {deliveries - 1} times (its worker process died each time, e.g. out of "
                  "memory); not retried")
        services.mark_failed(source_id, reason)
        return {"source_id": source_id, "status": "failed", "chunks": 0, "error": reason}
    try:
        result = services.document_ingest(source_id, force=force)
    except Exception as error:
        services.mark_failed(source_id, services.internal_error_reason(error))
        raise
    return _result_dict(result)


@shared_task(name="knowledge.ingest_sources", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_sources(self, source_ids: list[int], force: bool = False) -> list[dict]:
    """Ingest the sources ``source_ids`` together (see ``services.documents_ingest``: their chunks
    are embedded in shared batches, each source is stored in its own transaction and fails alone);
    safe to run twice. Returns one dict per source, as ``ingest_source`` does.

    An unexpected error outside any one source (the embedding model itself) marks the sources still
    queued, parsing or embedding as failed with the error's text and is re-raised. A redelivery (the
    worker process died during the first delivery, e.g. a file that exhausts memory) does not run the
    batch again: it queues one ``ingest_source`` task for each source not yet finished (those reported
    ``"requeued"``), so such a file again fails alone after its own ``INGEST_MAX_DELIVERIES``
    deliveries while the others are ingested.
    """
    from knowledge.selectors import source_ids_unfinished

    source_ids = [int(source_id) for source_id in source_ids]
    if stuck_ingestions.ingest_delivery_count(self.request.id) > 1:
        unfinished = source_ids_unfinished(source_ids)
        for source_id in unfinished:
            ingest_source.delay(source_id, force=force)
        return [{"source_id": pk, "status": "requeued" if pk in unfinished else "already finished", "chunks": 0,
                 "error": ""} for pk in source_ids]
    try:
        results = services.documents_ingest(source_ids, force=force)
    except Exception as error:
        services.sources_fail_unfinished(source_ids, services.internal_error_reason(error))
        raise
    return [_result_dict(result) for result in results]


def _result_dict(result: services.IngestResult) -> dict:
    return {"source_id": result.source_id, "status": result.status, "chunks": result.chunk_count, "error": result.error}


@shared_task(name="knowledge.sync_website", acks_late=True)
def sync_website(website_id: int, sync_id: int | None = None) -> dict:
    """Sync website ``website_id`` (see ``websites.website_sync``): the queued run ``sync_id``, or a
    new run (the beat schedule passes only the website). Safe to run twice; returns the run's counts."""
    from knowledge import websites

    run = websites.website_sync(website_id, sync_id)
    if run is None:
        return {"website_id": website_id, "status": "missing"}
    return {"website_id": website_id, "sync_id": run.pk, "status": run.status, "error": run.error,
            **{k: getattr(run, k) for k in ("new", "changed", "unchanged", "removed", "failed", "skipped")}}


@shared_task(name="knowledge.fail_stuck_sources")
def fail_stuck_sources() -> int:
    """Fail sources left in parsing/embedding without progress for ``INGEST_STUCK_S``
    (``stuck_ingestions.sources_fail_stuck``). Returns how many; safe to run twice."""
    return stuck_ingestions.sources_fail_stuck()


@shared_task(name="knowledge.send_unsent_sources")
def send_unsent_sources() -> int:
    """Send the ingestion tasks that could not be sent while the task queue was unreachable
    (``services.sources_send_unsent``; Celery beat, every ``STUCK_WORK_SWEEP_S``). Returns how many
    sources; safe to run twice."""
    return services.sources_send_unsent()


@shared_task(name="knowledge.activate_embedding_version", acks_late=True, reject_on_worker_lost=True)
def activate_embedding_version(version_id: int, note: str = "") -> str:
    """Switch every process to embedding version ``version_id`` (a promotion or a rollback queued by
    ``services.embedding_version_promotion_request``; the default queue): ``services.
    embedding_version_promotion_run``. Safe to deliver twice (only a ``promoting`` version is switched;
    a worker killed mid-switch rolls its transaction back and the redelivery runs it again). Returns
    the version's status afterwards: ``"active"``, or the status it went back to when the switch
    failed (the reason is on the version; the active version kept serving). Unexpected errors are
    re-raised for the worker's log after the version was put back."""
    from knowledge.models import EmbeddingModelVersion

    try:
        return services.embedding_version_promotion_run(version_id, note=note).status
    except (services.EmbeddingVersionError, EmbeddingModelVersion.DoesNotExist):
        return EmbeddingModelVersion.objects.filter(pk=version_id).values_list("status", flat=True).first() or "missing"
