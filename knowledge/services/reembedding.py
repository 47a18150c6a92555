"""Re-embedding: new vectors for the stored chunks after the embedding model changed (``reembed``),
source by source, or, when the active version's dimension differs from the stored column's, all at
once with the schema change of the vector column and its HNSW index. Always with the active
embedding version (``knowledge.embedding.active_embedding``: the settings' model until a version is
registered); a candidate version's vectors are built by ``knowledge.services.embedding_versions``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from django.conf import settings
from django.db import connection, transaction

from knowledge import embedding as embedding_module
from knowledge.models import HNSW_EF_CONSTRUCTION, HNSW_M, Chunk, Source


def embedding_text(source: Source, chunk: Chunk) -> str:
    """The text embedded for ``chunk`` of ``source``: the question alone for a curated answer (a new
    question is compared with the question it answers), else the passage with its title and headings
    (``embedding.passage_text``)."""
    if source.kind == Source.Kind.CURATED:
        return source.curated.question
    return embedding_module.passage_text(source.title, chunk.heading_path, chunk.text)


@dataclass
class ReembedResult:
    """Sources whose chunks were re-embedded, and chunks written."""

    sources: int = 0
    chunks: int = 0


def reembed(*, collection: str | None = None, everything: bool = False,
            report: Callable[[int, int], None] | None = None) -> ReembedResult:
    """Re-embed chunks written by another embedding model (or all chunks with ``everything``).

    Chunks keep their text and offsets; only vectors change. Each source is swapped in its own
    transaction, so old vectors serve until its new ones commit. If the active version's dimension
    (``EMBEDDING_DIM`` for the settings' model) differs from the stored column's dimension, every
    chunk is re-embedded first and the column and its HNSW index are rebuilt in one transaction
    (searches wait for it, they never see a mix).
    ``report(done, total)`` is called after each source.
    """
    active = embedding_module.active_embedding()
    model = embedding_module.encoder_for(active)
    if _stored_vector_dimension() != active.dimension:
        return _reembed_new_dimension(model, active.model_id, active.dimension, report)
    current = active.model_id
    sources = Source.objects.filter(chunk_count__gt=0)
    if collection:
        sources = sources.filter(collection=collection)
    if not everything:
        sources = sources.filter(pk__in=Chunk.objects.exclude(embedding_model=current).values("source_id"))
    sources = list(sources.order_by("pk"))
    result = ReembedResult()
    for index, source in enumerate(sources, start=1):
        result.chunks += _reembed_source(source.pk)
        result.sources += 1
        if report:
            report(index, len(sources))
    return result


@transaction.atomic
def _reembed_source(source_id: int) -> int:
    """Re-embed one source's chunks in place with the active version (one transaction, under the
    vectors lock, so no promotion interleaves); returns the number of chunks."""
    from knowledge.services.embedding_versions import vectors_lock_shared

    vectors_lock_shared()
    active = embedding_module.active_embedding()
    model = embedding_module.encoder_for(active)
    locked = Source.objects.select_for_update().get(pk=source_id)
    chunks = list(locked.chunks.order_by("ordinal"))
    texts = [embedding_text(locked, c) for c in chunks]
    for chunk, vector in zip(chunks, model.encode(texts)):
        chunk.embedding, chunk.embedding_model = vector, active.model_id
    Chunk.objects.bulk_update(chunks, ["embedding", "embedding_model"], batch_size=500)
    return len(chunks)


def _stored_vector_dimension() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'knowledge_chunk'::regclass "
            "AND attname = 'embedding'"
        )
        return cursor.fetchone()[0]


def _reembed_new_dimension(model, current: str, dim: int, report) -> ReembedResult:
    rows = list(Chunk.objects.select_related("source").order_by("pk"))
    texts = [embedding_text(c.source, c) for c in rows]
    vectors = model.encode(texts)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("LOCK TABLE knowledge_chunk IN ACCESS EXCLUSIVE MODE")
        cursor.execute("DROP INDEX IF EXISTS chunk_embedding_hnsw")
        cursor.execute("ALTER TABLE knowledge_chunk ALTER COLUMN embedding DROP NOT NULL")
        cursor.execute(f"ALTER TABLE knowledge_chunk ALTER COLUMN embedding TYPE vector({dim}) USING NULL")
        for chunk, vector in zip(rows, vectors):
            chunk.embedding, chunk.embedding_model = vector, current
        Chunk.objects.bulk_update(rows, ["embedding", "embedding_model"], batch_size=500)
        cursor.execute("ALTER TABLE knowledge_chunk ALTER COLUMN embedding SET NOT NULL")
        cursor.execute(
            "CREATE INDEX chunk_embedding_hnsw ON knowledge_chunk USING hnsw "
            f"(embedding vector_cosine_ops) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
    sources = len({c.source_id for c in rows})
    if report:
        report(sources, sources)
    return ReembedResult(sources=sources, chunks=len(rows))
