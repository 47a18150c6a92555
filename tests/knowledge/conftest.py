"""Fixtures of the knowledge-base tests: a private media folder, files on disk, ingestion helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge import services
from knowledge.models import Chunk, Source


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path) -> Path:
    """Uploads and product renderings go to this test's own folder, never the project's."""
    folder = tmp_path / "media"
    folder.mkdir()
    settings.MEDIA_ROOT = str(folder)
    return folder


@pytest.fixture
def kb_folder(tmp_path) -> Path:
    """An empty folder for knowledge-base files."""
    folder = tmp_path / "kb"
    folder.mkdir()
    return folder


def ingest_paths(paths, *, collection: str = "default") -> dict[str, services.IngestResult]:
    """Register ``paths`` and ingest every queued source in this process (what ``manage.py ingest
    --sync`` does); returns the results by file name."""
    registered = services.sources_register_paths(paths, collection=collection, enqueue=False)
    return {Path(s.uri).name: services.document_ingest(s.pk) for s in registered.queued}


def serving_snapshot(source_id: int) -> dict:
    """Everything a reader of ``source_id`` sees: the serving text, hash, title and chunk count, and
    every chunk with its id, offsets, text, headings, embedding and full-text vector."""
    source = Source.objects.get(pk=source_id)
    chunks = [
        (c.pk, c.ordinal, c.start, c.end, c.text, c.heading_path, c.token_count, [float(x) for x in c.embedding],
         c.embedding_model, c.search_vector)
        for c in Chunk.objects.filter(source_id=source_id).order_by("ordinal")
    ]
    return {
        "text": source.text,
        "content_hash": source.content_hash,
        "title": source.title,
        "chunk_count": source.chunk_count,
        "ingested_at": source.ingested_at,
        "chunks": chunks,
    }
