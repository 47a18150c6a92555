"""Celery tasks of the knowledge base: thin wrappers around ``knowledge.services``."""

from __future__ import annotations

from celery import shared_task

from knowledge import services


@shared_task(name="knowledge.ingest_source", acks_late=True)
def ingest_source(source_id: int, force: bool = False) -> dict:
    """Ingest source ``source_id`` (see ``services.document_ingest``); safe to run twice.

    An unexpected error marks the source failed with the error's text and is re-raised for the
    worker's log; the serving chunks stay as they were.
    """
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
