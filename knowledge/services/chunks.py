"""Storing a source's chunks: the swap that replaces them (keeping the ids of unchanged passages) and
the full-text vectors Postgres searches (``update_search_vectors``). Ingestion and curated answers
both write chunks through here; the caller holds the transaction and the source's row lock. The swap
also keeps the embedding versions in step (``knowledge.services.embedding_versions``): the chunks'
vectors are the active version's, and candidate versions get theirs."""

from __future__ import annotations

from django.db import connection

from knowledge.models import Chunk, Source
from knowledge.services.embedding_versions import chunk_vectors_prepare, shadow_embeddings_write


def _swap_chunks(source: Source, chunks: list[Chunk], *, title: str) -> None:
    """Replace ``source``'s chunks with ``chunks`` (caller holds the transaction and the row lock).

    A new chunk whose text equals an old chunk's takes over that chunk's id (first come, first
    served among repeats), with its new offsets: citations, retrieval traces and corrections that
    name the id keep pointing at the same passage after a re-ingestion, wherever it now sits in the
    text. Chunks whose text changed get new ids; the old ones are deleted.

    ``chunks`` carry the vectors of the encoder that embedded them (``embedding_model``); under the
    vectors lock (shared) those of another version than the active one (a promotion committed since)
    are embedded again with the active one, and every candidate version (building or ready) gets its
    vectors of the new chunks (``shadow_embeddings_write``): ingestion during a re-embed lands in both.
    """
    chunk_vectors_prepare(source, chunks, title=title)
    old_ids: dict[str, list[int]] = {}
    for pk, text in source.chunks.order_by("ordinal").values_list("pk", "text"):
        old_ids.setdefault(text, []).append(pk)
    source.chunks.all().delete()
    for chunk in chunks:
        chunk.source_id = source.pk
        reusable = old_ids.get(chunk.text)
        chunk.pk = reusable.pop(0) if reusable else None
    Chunk.objects.bulk_create(chunks, batch_size=500)
    shadow_embeddings_write(source, chunks, title=title)
    update_search_vectors(source.pk, title)


def update_search_vectors(source_id: int, title: str) -> None:
    """Set the full-text vector of ``source_id``'s chunks: title and headings weighted A, passage B
    (Postgres ``english`` configuration)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE knowledge_chunk SET search_vector =
                setweight(to_tsvector('english', %s || ' ' || coalesce(
                    (SELECT string_agg(value, ' ') FROM jsonb_array_elements_text(heading_path)), '')), 'A')
                || setweight(to_tsvector('english', text), 'B')
            WHERE source_id = %s
            """,
            [title, source_id],
        )
