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
