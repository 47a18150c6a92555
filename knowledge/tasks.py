"""Celery tasks of the knowledge base: thin wrappers around ``knowledge.services``.

``ingest_source`` is ``acks_late`` with ``reject_on_worker_lost``: when its worker's pool process
dies mid-ingestion (killed, out of memory) the message goes back to the queue and another delivery
re-runs it (ingestion is idempotent), at most ``INGEST_MAX_DELIVERIES`` times. Without
``reject_on_worker_lost`` Celery acknowledges such a task as failed and it is lost, leaving its source
in ``embedding`` for ever. ``fail_stuck_sources`` (Celery beat) fails what is still stuck
(``knowledge.stuck_ingestions``).
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
        services.mark_failed(source_id, f"internal error during ingestion: {type(error).__name__}: {error}")
        raise
    return {"source_id": result.source_id, "status": result.status, "chunks": result.chunk_count, "error": result.error}


@shared_task(name="knowledge.reembed")
def reembed(collection: str | None = None, everything: bool = False) -> dict:
    """Re-embed chunks of another embedding model (see ``services.reembed``)."""
    result = services.reembed(collection=collection, everything=everything)
    return {"sources": result.sources, "chunks": result.chunks}


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
