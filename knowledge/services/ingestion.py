"""Ingestion: reading a source's pending version, parsing, chunking, embedding and swapping it in.

Ingestion of one source (``document_ingest``) reads its bytes, skips them if unchanged, parses,
chunks and embeds them, then swaps the source's chunks, text and hash in one transaction: readers see
the old version or the new one, never a mix or nothing. Any failure marks the source ``failed`` with
the reason, deletes the pending file it could not ingest, and leaves its serving chunks untouched.
Many sources at once (a folder, ``manage.py ingest``, the worker's ``knowledge.ingest_sources``) go
through ``documents_ingest``: the same steps per source, but the chunks of several sources are
embedded together in length-sorted batches (the embedding model is faster on full batches of similar
lengths than on one file's few chunks), and each source is still swapped in its own transaction and
fails alone.

A source can be re-uploaded while an older version is still being ingested. Each queued version
raises ``Source.pending_version``; an ingestion claims the version (and pending file) it read at its
start and writes progress, failure or chunks only while that claim is still current. A superseded
ingestion stops (status ``"superseded"``) and leaves the source to the newer version's own task, which
was queued when that version was stored. A replaced pending file is deleted only once the transaction
that replaced it commits.

Swapping in a new version retires the curated answers citing the old one
(``knowledge.services.curated``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from django.conf import settings
from django.core.files.storage import Storage
from django.db import transaction
from django.db.models import Q
from django.db.models.fields.files import FieldFile
from django.utils import timezone

from knowledge import embedding as embedding_module
from knowledge.chunking import ChunkSpan, chunk_document
from knowledge.models import Chunk, Source
from knowledge.parsers import ParsedDocument, ParseError, parse_file
from knowledge.services.chunks import _swap_chunks
from knowledge.services.curated import _curated_retire_citing
from knowledge.services.lexemes import lexeme_frequencies_refresh
from knowledge.services.reembedding import _reembed_source

logger = logging.getLogger(__name__)


class SourceUnavailable(Exception):
    """The source's bytes cannot or may not be read (file moved, deleted, or over the size limit)."""


@dataclass(frozen=True)
class IngestResult:
    """Outcome of ``document_ingest``: ``status`` is ``"ingested"``, ``"unchanged"``, ``"failed"``,
    ``"missing"`` (the source row was deleted before or while the task ran) or ``"superseded"`` (a
    newer version was queued while it ran, or another run already finished this version: nothing was
    written, the newer version's own task ingests it)."""

    source_id: int
    status: str
    chunk_count: int = 0
    error: str = ""


def _read_bytes(source: Source) -> tuple[str, bytes]:
    if source.pending_file:
        return _read_pending_file(source.pending_file)
    if source.uri.startswith(("upload:", "product:", "curated:")):
        raise SourceUnavailable("there is no pending file to ingest; upload the file again")
    path = Path(source.uri)
    try:
        if path.stat().st_size > settings.INGEST_MAX_FILE_BYTES:
            raise SourceUnavailable(too_large_reason())  # not read into memory at all
        return path.name, path.read_bytes()
    except OSError as error:
        raise SourceUnavailable(f"cannot read {path} ({error.strerror or error})") from None


def _read_pending_file(pending_file: FieldFile) -> tuple[str, bytes]:
    """The storage name and bytes of an uploaded version, read through its storage (the file system,
    or object storage through django-storages). Raises ``SourceUnavailable`` when it is over
    ``INGEST_MAX_FILE_BYTES`` (not read into memory at all) or when reading fails and the storage
    says it no longer holds the name (``_missing_upload_reason``; backends raise different exceptions
    for a missing name, an ``OSError`` or their client's own, so ``exists()`` decides, not the
    exception's type). Any other error of the storage (an outage, a permission problem) is raised as
    it is, with its own text."""
    storage, name = pending_file.storage, pending_file.name
    try:
        if pending_file.size > settings.INGEST_MAX_FILE_BYTES:
            raise SourceUnavailable(too_large_reason())
        with pending_file.open("rb") as handle:
            return name, handle.read()
    except SourceUnavailable:
        raise
    except Exception:
        if _storage_lacks(storage, name):
            raise SourceUnavailable(_missing_upload_reason(name)) from None
        raise


def _storage_lacks(storage: Storage, name: str) -> bool:
    """Whether ``storage`` says it holds no file ``name``; ``False`` when it cannot tell either (its
    ``exists`` fails too, e.g. while it is unreachable), so that the caller's own error is reported."""
    try:
        return not storage.exists(name)
    except Exception:
        logger.warning("cannot tell whether %s is still in the upload storage", name, exc_info=True)
        return False


def _missing_upload_reason(name: str) -> str:
    """Why an uploaded version whose stored file ``name`` is gone cannot be ingested; the same on
    every storage backend."""
    return f"the uploaded file is missing ({name}); upload the file again"


def too_large_reason() -> str:
    """Why a file over ``INGEST_MAX_FILE_BYTES`` is refused (``the file is larger than the 20 MB limit (...)``)."""
    limit_mb = settings.INGEST_MAX_FILE_BYTES / (1024 * 1024)
    return f"the file is larger than the {limit_mb:g} MB limit (INGEST_MAX_FILE_BYTES)"


class _Superseded(Exception):
    """The version an ingestion claimed is no longer the one queued (see ``_Claim``)."""


@dataclass(frozen=True)
class _Claim:
    """The version of a source an ingestion works on: the ``pending_version`` and pending file name
    it read at its start. Every write of the ingestion is conditional on both being unchanged: a
    newer upload raises the version; a run of the same version that finished first cleared the file."""

    source_id: int
    version: int
    pending_file: str

    @classmethod
    def of(cls, source: Source) -> "_Claim":
        return cls(source.pk, source.pending_version, source.pending_file.name or "")

    def rows(self):
        """The source's row while the claim holds (an empty queryset once it does not)."""
        return Source.objects.filter(pk=self.source_id, pending_version=self.version, pending_file=self.pending_file)

    def holds_for(self, source: Source) -> bool:
        return (source.pending_version, source.pending_file.name or "") == (self.version, self.pending_file)

    def delete_pending_file_on_commit(self) -> None:
        if self.pending_file:
            storage, name = Source._meta.get_field("pending_file").storage, self.pending_file
            transaction.on_commit(lambda: storage.delete(name))


def _set_progress(claim: _Claim, status: str, progress: int) -> None:
    """Report progress; raises ``_Superseded`` (and writes nothing) once the claim no longer holds."""
    if not claim.rows().update(status=status, progress=progress, updated_at=timezone.now()):
        raise _Superseded


def mark_failed(source_id: int, reason: str) -> None:
    """Record that the latest ingestion of ``source_id`` failed because of ``reason``."""
    Source.objects.filter(pk=source_id).update(
        status=Source.Status.FAILED, error=reason, progress=0, updated_at=timezone.now()
    )


def sources_fail_unfinished(source_ids: Iterable[int], reason: str) -> set[int]:
    """Mark ``failed`` with ``reason`` those of ``source_ids`` still queued, parsing or embedding
    (the ones an interrupted batch did not finish; ready and failed sources are left as they are).
    Returns their ids. Serving chunks are not touched."""
    from knowledge.selectors import source_ids_unfinished

    ids = set(source_ids_unfinished(list(source_ids)))
    Source.objects.filter(
        pk__in=ids, status__in=Source.UNFINISHED_STATUSES
    ).update(status=Source.Status.FAILED, error=reason, progress=0, updated_at=timezone.now())
    return ids


def _fail(claim: _Claim, reason: str, *, keep_file: bool = False) -> IngestResult:
    """Mark the claimed version failed with ``reason`` and delete its pending file (its bytes cannot
    be ingested; the admin uploads a corrected file), or with ``keep_file`` keep it (the failure was
    not the file's: the admin's "Re-ingest" retries it). Raises ``_Superseded`` (nothing written) when
    a newer version was queued meanwhile."""
    with transaction.atomic():
        if not claim.rows().update(status=Source.Status.FAILED, error=reason, progress=0,
                                   **({} if keep_file else {"pending_file": ""}), updated_at=timezone.now()):
            raise _Superseded
        if not keep_file:
            claim.delete_pending_file_on_commit()
    logger.warning("ingestion of source %s failed: %s", claim.source_id, reason)
    return IngestResult(claim.source_id, "failed", error=reason)


def document_ingest(source_id: int, *, force: bool = False) -> IngestResult:
    """Parse, chunk, embed and store the pending version of source ``source_id``.

    Safe to run twice: bytes that hash to the serving ``content_hash`` (with chunks of the current
    embedding model) are skipped unless ``force``. Bad input (empty, unsupported type, over
    ``INGEST_MAX_FILE_BYTES``, corrupt, not UTF-8, no text, CSV without question/answer columns)
    returns status ``"failed"``, records the reason on the source and deletes its pending file;
    serving chunks are untouched. A version superseded while this runs (re-uploaded, or finished by
    another run) returns ``"superseded"`` as soon as that is seen, having written nothing: not its
    chunks, status or failure, and not the deletion of the newer version's file.
    Side effects: ``status``/``progress`` updates visible to other connections while it runs.
    For many sources at once use ``documents_ingest``, which embeds their chunks together.
    """
    prepared = _ingest_prepare(source_id, force=force)
    if isinstance(prepared, IngestResult):
        return prepared
    model = embedding_module.get_embedding_model()
    try:
        vectors = _embed_with_progress(
            model, prepared.texts, lambda pct: _set_progress(prepared.claim, Source.Status.EMBEDDING, pct)
        )
    except _Superseded:
        return _superseded(source_id)
    result = _ingest_store(prepared, vectors)
    _lexemes_refresh([result])
    return result


def documents_ingest(
    source_ids: Iterable[int], *, force: bool = False, on_result: Callable[[IngestResult], None] | None = None,
) -> list[IngestResult]:
    """Ingest many sources, embedding the chunks of several sources in each call of the model.

    Each source goes through the same steps and outcomes as ``document_ingest`` (hash skip unless
    ``force``, the same failure reasons, the same atomic swap), but the sources are taken in rounds:
    sources are read, parsed and chunked until the round holds ``INGEST_BATCH_CHUNKS`` chunks (or the
    ids run out), then all the round's chunk texts are embedded together, sorted by length into
    batches of ``EMBEDDING_BATCH_SIZE`` (as sentence-transformers' ``encode`` does within one call, so
    a batch pads little), and then each source of the round is stored in its own transaction. One
    source's failure (bad input, or an unexpected error while preparing or storing it) marks only
    that source failed with the reason (an unexpected one as ``internal error during ingestion:
    <type>: <message>``, logged with its traceback); the others go on, and the failed source's serving
    chunks are untouched. An error of the embedding model itself fails the whole round's sources
    and is re-raised.

    ``source_ids``: ids in the order to ingest (repeats are ingested once). ``on_result`` is called
    with each source's ``IngestResult`` as soon as it is known (e.g. a progress bar). Returns the
    results in the order of ``source_ids``. Side effects: as ``document_ingest`` for each source.
    """
    results: dict[int, IngestResult] = {}

    def done(result: IngestResult) -> None:
        results[result.source_id] = result
        if on_result:
            on_result(result)

    round_: list[_PreparedSource] = []
    for source_id in dict.fromkeys(source_ids):
        prepared = _ingest_prepare(source_id, force=force, contain_errors=True)
        if isinstance(prepared, IngestResult):
            done(prepared)
            continue
        round_.append(prepared)
        if sum(len(p.texts) for p in round_) >= settings.INGEST_BATCH_CHUNKS:
            _ingest_round(round_, done)
            round_ = []
    if round_:
        _ingest_round(round_, done)
    _lexemes_refresh(results.values())
    return [results[source_id] for source_id in dict.fromkeys(source_ids)]


def _lexemes_refresh(results: Iterable[IngestResult]) -> None:
    """Recompute the lexeme document frequencies of the collections whose chunks ``results`` changed."""
    ingested = [result.source_id for result in results if result.status == "ingested"]
    if ingested:
        lexeme_frequencies_refresh(Source.objects.filter(pk__in=ingested).values_list("collection", flat=True))


def internal_error_reason(error: BaseException) -> str:
    """The reason recorded on a source whose ingestion raised an unexpected ``error``."""
    return f"internal error during ingestion: {type(error).__name__}: {error}"


def _ingest_round(round_: list[_PreparedSource], done: Callable[[IngestResult], None]) -> None:
    """Embed the chunk texts of ``round_`` together, then store each source in its own transaction."""
    texts = [text for p in round_ for text in p.texts]
    claimed = functools.reduce(operator.or_, (
        Q(pk=p.claim.source_id, pending_version=p.claim.version, pending_file=p.claim.pending_file) for p in round_))

    def report(pct: int) -> None:
        # One query for the round; a source superseded meanwhile is not matched (its store step sees it).
        Source.objects.filter(claimed).update(status=Source.Status.EMBEDDING, progress=pct, updated_at=timezone.now())

    try:
        vectors = _embed_with_progress(embedding_module.get_embedding_model(), texts, report)
    except Exception as error:
        for prepared in round_:
            _fail_unexpected(prepared.claim, error)
        raise
    offset = 0
    for prepared in round_:
        part = vectors[offset : offset + len(prepared.texts)]
        offset += len(prepared.texts)
        done(_ingest_store(prepared, part, contain_errors=True))


@dataclass
class _PreparedSource:
    """A source read, parsed and chunked, waiting for its chunk texts' embeddings."""

    source_id: int
    claim: _Claim
    digest: str
    document: ParsedDocument
    spans: list[ChunkSpan]
    texts: list[str]  # what is embedded for each span (``passage_text``), in span order


def _ingest_prepare(source_id: int, *, force: bool, contain_errors: bool = False) -> IngestResult | _PreparedSource:
    """Claim the pending version of source ``source_id``, then read, hash-check, parse and chunk it:
    an ``IngestResult`` when it is done (missing, unchanged, failed or superseded), else what its
    embedding and storing need. With ``contain_errors`` an unexpected error fails the source (see
    ``_fail_unexpected``) instead of propagating."""
    source = Source.objects.filter(pk=source_id).first()
    if source is None:
        return IngestResult(source_id, "missing")
    claim = _Claim.of(source)
    try:
        return _ingest_claimed(source, claim, force=force)
    except _Superseded:
        return _superseded(source_id)
    except Exception as error:
        if not contain_errors:
            raise
        return _fail_unexpected(claim, error)


def _superseded(source_id: int) -> IngestResult:
    if not Source.objects.filter(pk=source_id).exists():
        return IngestResult(source_id, "missing")
    logger.info("ingestion of source %s stopped: a newer version was queued meanwhile", source_id)
    return IngestResult(source_id, "superseded")


def _fail_unexpected(claim: _Claim, error: Exception) -> IngestResult:
    """Fail the claimed version with ``internal_error_reason(error)`` (logged with its traceback),
    keeping its pending file: an unexpected error (a storage outage, a bug) says nothing against the
    uploaded bytes, so "Re-ingest" can retry them, as after a failed single-source task
    (``mark_failed``). ``"superseded"`` when a newer version was queued meanwhile."""
    logger.error("ingestion of source %s failed unexpectedly", claim.source_id, exc_info=error)
    try:
        return _fail(claim, internal_error_reason(error), keep_file=True)
    except _Superseded:
        return _superseded(claim.source_id)


def _ingest_claimed(source: Source, claim: _Claim, *, force: bool) -> IngestResult | _PreparedSource:
    source_id = source.pk
    if (
        not source.pending_file
        and source.uri.startswith(("upload:", "product:", "curated:"))
        and source.content_hash
        and source.chunk_count > 0
    ):
        # An upload or product whose pending bytes were already ingested (a task run twice, or a
        # forced re-ingest): its raw bytes are gone, so a forced run re-embeds the serving chunks.
        if force:
            _reembed_source(source_id)
        _finish_unchanged(claim)
        return IngestResult(source_id, "unchanged", source.chunk_count)
    try:
        filename, data = _read_bytes(source)
    except SourceUnavailable as error:
        return _fail(claim, str(error))
    if len(data) > settings.INGEST_MAX_FILE_BYTES:
        return _fail(claim, too_large_reason())
    digest = hashlib.sha256(data).hexdigest()
    if (
        not force
        and digest == source.content_hash
        and source.chunk_count > 0
        and not source.chunks.exclude(embedding_model=embedding_module.model_id()).exists()
    ):
        _finish_unchanged(claim)
        return IngestResult(source_id, "unchanged", source.chunk_count)

    _set_progress(claim, Source.Status.PARSING, 5)
    try:
        document = parse_file(filename, data)
    except ParseError as error:
        return _fail(claim, str(error))
    if source.kind == Source.Kind.FAQ and not any(b.kind == "faq" for b in document.blocks):
        return _fail(claim, "an FAQ sheet must be a CSV file with question and answer columns")

    model = embedding_module.get_embedding_model()
    spans = chunk_document(document, max_tokens=settings.CHUNK_MAX_TOKENS, count_tokens=model.count_tokens)
    _set_progress(claim, Source.Status.EMBEDDING, 10)
    texts = [
        embedding_module.passage_text(document.title, span.heading_path, document.text[span.start : span.end])
        for span in spans
    ]
    return _PreparedSource(source_id, claim, digest, document, spans, texts)


def _ingest_store(prepared: _PreparedSource, vectors, *, contain_errors: bool = False) -> IngestResult:
    """Swap ``prepared``'s chunks (``vectors[i]`` the embedding of ``prepared.texts[i]``), text and
    hash into its source in one transaction, if its claim still holds; retire curated answers citing
    its old version. With ``contain_errors`` an unexpected error fails the source instead of
    propagating."""
    try:
        return _ingest_store_claimed(prepared, vectors)
    except _Superseded:
        return _superseded(prepared.source_id)
    except Exception as error:
        if not contain_errors:
            raise
        return _fail_unexpected(prepared.claim, error)


def _ingest_store_claimed(prepared: _PreparedSource, vectors) -> IngestResult:
    source_id, claim, document, digest = prepared.source_id, prepared.claim, prepared.document, prepared.digest
    # The version that embedded them; ``_swap_chunks`` re-embeds them if another one became active since.
    current_model = embedding_module.vectors_model_id(vectors) or embedding_module.model_id()
    chunks = [
        Chunk(
            ordinal=ordinal,
            start=span.start,
            end=span.end,
            text=document.text[span.start : span.end],
            heading_path=list(span.heading_path),
            token_count=span.token_count,
            embedding=vector,
            embedding_model=current_model,
        )
        for ordinal, (span, vector) in enumerate(zip(prepared.spans, vectors, strict=True))
    ]
    with transaction.atomic():
        locked = Source.objects.select_for_update().filter(pk=source_id).first()
        if locked is None:
            return IngestResult(source_id, "missing")
        if not claim.holds_for(locked):
            raise _Superseded
        _swap_chunks(locked, chunks, title=document.title)
        if digest != locked.content_hash:
            _curated_retire_citing(source_id, f"source {source_id} changed", keep_hash=digest)
        Source.objects.filter(pk=source_id).update(
            text=document.text,
            title=(locked.title if locked.kind == Source.Kind.PRODUCT else document.title)[:500],
            content_hash=digest,
            status=Source.Status.READY,
            progress=100,
            error="",
            chunk_count=len(chunks),
            pending_file="",
            ingested_at=timezone.now(),
            updated_at=timezone.now(),
        )
        claim.delete_pending_file_on_commit()
    return IngestResult(source_id, "ingested", len(chunks))


def _finish_unchanged(claim: _Claim) -> None:
    """Mark the claimed version ready without touching the chunks, and delete its pending file once
    that commits; raises ``_Superseded`` (nothing written) when the claim no longer holds."""
    with transaction.atomic():
        if not claim.rows().update(status=Source.Status.READY, progress=100, error="", pending_file="",
                                   updated_at=timezone.now()):
            raise _Superseded
        claim.delete_pending_file_on_commit()


def _embed_with_progress(model, texts: list[str], report: Callable[[int], None]) -> np.ndarray:
    """Embed ``texts`` (one unit vector per text, in their order: ``(len(texts), model.dimension)``,
    tagged with the model's version identity)
    in batches of ``EMBEDDING_BATCH_SIZE`` texts of similar length, calling ``report(pct)`` (10..95)
    after each batch.

    The texts are sorted by length, longest first, before batching, as sentence-transformers'
    ``SentenceTransformer.encode`` sorts the texts of one call: a batch is padded to its longest
    text, so similar lengths waste the least. Encoding batch by batch keeps the progress moving
    (``knowledge.stuck_ingestions`` fails a source whose progress stalls).
    """
    batch = settings.EMBEDDING_BATCH_SIZE
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    vectors = embedding_module.tag_vectors(np.zeros((len(texts), model.dimension), dtype=np.float32), model.model_id)
    for offset in range(0, len(order), batch):
        picked = order[offset : offset + batch]
        vectors[picked] = model.encode([texts[i] for i in picked], batch_size=batch)
        report(10 + int(85 * min(len(texts), offset + batch) / max(len(texts), 1)))
    return vectors
