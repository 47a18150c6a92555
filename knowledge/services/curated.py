"""Curated answers: approved corrections stored as sources.

A curated answer (``curated_answer_put``) is a source of kind ``curated`` with one chunk embedded
from its question; it cites evidence passages of other sources. When one of those sources is
re-ingested with other content or deleted, the curated answer is retired in the same transaction
(its chunk deleted, ``retired_reason`` set, ``_curated_retire_citing``), so an answer whose evidence
changed is never served.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from django.db import transaction
from django.utils import timezone

from knowledge import embedding as embedding_module
from knowledge.models import DEFAULT_COLLECTION, Chunk, CuratedAnswer, CuratedEvidence, Source
from knowledge.services.chunks import _swap_chunks


class CuratedAnswerError(ValueError):
    """A curated answer that cannot be stored as given (nothing is stored); the message says why."""


def _curated_hash(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\n\n{answer}".encode()).hexdigest()


def _curated_evidence_rows(evidence: Iterable[dict]) -> list[CuratedEvidence]:
    """Validate ``evidence`` (``[{"source_id", "start", "end", "content_hash"}]``): each source
    exists with that hash (the passage is the one the writer saw) and has a chunk with exactly that
    range. Raises ``CuratedAnswerError`` otherwise."""
    rows = []
    for ordinal, item in enumerate(evidence):
        source_id, start, end = int(item["source_id"]), int(item["start"]), int(item["end"])
        current = Source.objects.filter(pk=source_id).values_list("content_hash", flat=True).first()
        if current is None:
            raise CuratedAnswerError(f"evidence source {source_id} no longer exists")
        if current != item["content_hash"]:
            raise CuratedAnswerError(f"evidence source {source_id} changed since the passage was picked")
        if not Chunk.objects.filter(source_id=source_id, start=start, end=end).exists():
            raise CuratedAnswerError(f"source {source_id} has no passage [{start}, {end}) any more")
        rows.append(CuratedEvidence(ordinal=ordinal, source_id=source_id, start=start, end=end,
                                    content_hash=item["content_hash"]))
    if not rows:
        raise CuratedAnswerError("a curated answer needs at least one evidence passage")
    return rows


def _curated_write_chunk(source: Source, question: str, answer: str) -> None:
    """(Re)write the one chunk of curated ``source`` (the answer, embedded from the question) and
    its full-text vector; the caller holds the transaction."""
    model = embedding_module.get_embedding_model()
    vector = model.encode([question])[0]
    chunk = Chunk(ordinal=0, start=0, end=len(answer), text=answer, heading_path=[],
                  token_count=model.count_tokens(answer), embedding=vector,
                  embedding_model=model.model_id)
    _swap_chunks(source, [chunk], title=question)
    Source.objects.filter(pk=source.pk).update(
        title=question[:500], text=answer, content_hash=_curated_hash(question, answer), status=Source.Status.READY,
        progress=100, error="", chunk_count=1, ingested_at=timezone.now(), updated_at=timezone.now(),
    )


def _clean(text: str) -> str:
    return (text or "").strip()


@transaction.atomic
def curated_answer_put(*, key: str, collection: str, question: str, answer: str, evidence: Iterable[dict],
                       user=None) -> CuratedAnswer:
    """Store (or replace) the curated answer ``key`` of ``collection``: ``answer`` to ``question``,
    supported by ``evidence`` ``[{"source_id", "start", "end", "content_hash"}]`` (passages of
    ready sources, ``content_hash`` the source's hash when the passage was picked).

    Writes the source ``curated:<key>`` (kind ``curated``, title the question, text the answer),
    its one chunk embedded from the question (one call of the embedding model), the evidence rows;
    a retired entry of the same key is revived. Atomic (joins the caller's transaction).
    Raises ``CuratedAnswerError`` (nothing stored) for an empty key, question or answer, no
    evidence, or evidence whose source was deleted, changed (other hash) or has no chunk with that
    range.
    """
    key, question, answer = _clean(key), _clean(question), _clean(answer)
    if not key or not question or not answer:
        raise CuratedAnswerError("a curated answer needs a key, a question and an answer")
    rows = _curated_evidence_rows(evidence)
    moved = CuratedAnswer.objects.filter(key=key).exclude(source__collection=collection or DEFAULT_COLLECTION)
    for old in moved.select_related("source"):
        old.source.delete()  # the key moved to another collection: its old source goes
    source, _ = Source.objects.get_or_create(
        collection=collection or DEFAULT_COLLECTION, uri=f"curated:{key}"[:500],
        defaults={"kind": Source.Kind.CURATED, "title": question[:500]},
    )
    source = Source.objects.select_for_update().get(pk=source.pk)
    curated, _ = CuratedAnswer.objects.update_or_create(
        key=key, defaults={"source": source, "question": question, "answer": answer, "retired_reason": "",
                           "edited_by": user},
    )
    curated.evidence.all().delete()
    for row in rows:
        row.curated = curated
    CuratedEvidence.objects.bulk_create(rows)
    _curated_write_chunk(source, question, answer)
    return curated


@transaction.atomic
def curated_answer_update(curated_id: int, *, question: str, answer: str, user=None) -> CuratedAnswer:
    """Edit curated answer ``curated_id`` (an agent's wording): its question and answer are replaced
    and its chunk re-embedded from the new question, in one transaction (readers see the old entry or
    the new one). The evidence is kept. Raises ``CuratedAnswerError`` (nothing changed) for an empty
    question or answer or a retired entry, ``CuratedAnswer.DoesNotExist`` for an unknown id."""
    question, answer = _clean(question), _clean(answer)
    if not question or not answer:
        raise CuratedAnswerError("write both the question and the answer")
    curated = CuratedAnswer.objects.select_for_update().select_related("source").get(pk=curated_id)
    if curated.retired_reason:
        raise CuratedAnswerError(f"this curated answer is retired ({curated.retired_reason})")
    curated.question, curated.answer, curated.edited_by = question, answer, user
    curated.save(update_fields=["question", "answer", "edited_by", "updated_at"])
    _curated_write_chunk(curated.source, question, answer)
    return curated


@transaction.atomic
def curated_answer_delete(*, key: str) -> bool:
    """Delete the curated answer ``key`` with its source, chunk and evidence rows (joins the caller's
    transaction). Returns whether one existed."""
    curated = CuratedAnswer.objects.select_related("source").filter(key=key).first()
    if curated is None:
        return False
    curated.source.delete()  # cascades to the entry, its evidence and its chunk
    return True


def _curated_retire_citing(source_id: int, reason: str, *, keep_hash: str | None = None) -> int:
    """Retire the curated answers whose evidence comes from ``source_id`` (except evidence recorded
    with ``keep_hash``, the source's new hash): delete their chunk so they are neither served nor
    retrieved, and record ``reason``. The caller holds the transaction. Returns how many."""
    evidence = CuratedEvidence.objects.filter(source_id=source_id, curated__retired_reason="")
    if keep_hash is not None:
        evidence = evidence.exclude(content_hash=keep_hash)
    curated_ids = list(evidence.values_list("curated_id", flat=True).distinct())
    if not curated_ids:
        return 0
    source_ids = list(CuratedAnswer.objects.filter(pk__in=curated_ids).values_list("source_id", flat=True))
    Chunk.objects.filter(source_id__in=source_ids).delete()
    Source.objects.filter(pk__in=source_ids).update(chunk_count=0, updated_at=timezone.now())
    CuratedAnswer.objects.filter(pk__in=curated_ids).update(
        retired_reason=f"evidence changed: {reason}", updated_at=timezone.now())
    return len(curated_ids)
