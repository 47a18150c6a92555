"""Knowledge-base writes: registering sources, ingesting them, products, curated answers, deletion
and re-embedding.

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

A curated answer (``curated_answer_put``) is a source of kind ``curated`` with one chunk embedded
from its question; it cites evidence passages of other sources. When one of those sources is
re-ingested with other content or deleted, the curated answer is retired in the same transaction
(its chunk deleted, ``retired_reason`` set), so an answer whose evidence changed is never served.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile, File
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from knowledge import embedding as embedding_module
from knowledge.chunking import ChunkSpan, chunk_document
from knowledge.models import DEFAULT_COLLECTION, Chunk, CuratedAnswer, CuratedEvidence, Product, Source
from knowledge.parsers import ParsedDocument, ParseError, parse_file

logger = logging.getLogger(__name__)


class SourceUnavailable(Exception):
    """The source's bytes cannot or may not be read (file moved, deleted, or over the size limit)."""


class UploadRefused(ValueError):
    """An upload that is not stored (larger than ``INGEST_MAX_FILE_BYTES``); the message says why."""


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


# --- registering sources ------------------------------------------------------------------------


def sources_enqueue(source_ids: Iterable[int], *, force: bool = False) -> None:
    """Queue ingestion of ``source_ids`` when the current transaction commits: one
    ``knowledge.ingest_source`` task for a single source, else ``knowledge.ingest_sources`` tasks of
    at most ``INGEST_TASK_SOURCES`` sources each (their chunks are embedded together). ``force`` as
    in ``document_ingest``."""
    from knowledge.tasks import ingest_source, ingest_sources

    ids = list(source_ids)
    if len(ids) == 1:
        transaction.on_commit(lambda: ingest_source.delay(ids[0], force=force))
        return
    size = max(1, settings.INGEST_TASK_SOURCES)
    groups = [ids[offset : offset + size] for offset in range(0, len(ids), size)]
    transaction.on_commit(lambda: [ingest_sources.delay(group, force=force) for group in groups])


def _kind_for(filename: str) -> str:
    return Source.Kind.FAQ if filename.lower().endswith(".csv") else Source.Kind.FILE


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by ``paths``, folders walked recursively (hidden files and folders skipped),
    sorted. Raises ``FileNotFoundError`` for a path that does not exist."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {raw}")
        if path.is_file():
            found.append(path)
            continue
        for child in sorted(path.rglob("*")):
            relative = child.relative_to(path)
            if child.is_file() and not any(part.startswith(".") for part in relative.parts):
                found.append(child)
    return sorted(dict.fromkeys(found))


@dataclass
class RegisterResult:
    """Sources queued for ingestion, sources left as they were (same content hash), and sources
    deleted by ``prune``."""

    queued: list[Source]
    unchanged: list[Source]
    pruned: int = 0


@transaction.atomic
def sources_register_paths(
    paths: Iterable[str | Path], *, collection: str = DEFAULT_COLLECTION, prune: bool = False,
    enqueue: bool = True, force: bool = False,
) -> RegisterResult:
    """Register files and folders (recursively) as sources and queue changed ones for ingestion.

    A file whose bytes hash to the serving ``content_hash`` is left alone. With ``prune``, sources
    of ``collection`` that lived under one of the given folders but whose file is gone are deleted
    with their chunks. ``force`` queues unchanged files too (re-parse and re-embed them, e.g. after
    a parser or chunking change). Queued sources go to the worker in batches (``sources_enqueue``);
    with ``enqueue=False`` the caller ingests them itself (``documents_ingest``, as ``manage.py ingest
    --sync`` does). Raises ``FileNotFoundError`` if a path does not exist (nothing is queued).
    """
    paths = list(paths)
    files = iter_files(paths)
    result = RegisterResult(queued=[], unchanged=[])
    for file in files:
        uri = str(file)
        source, _ = Source.objects.get_or_create(
            collection=collection, uri=uri, defaults={"kind": _kind_for(file.name), "title": file.stem}
        )
        if not force and source.status == Source.Status.READY and source.content_hash == _file_hash(file):
            result.unchanged.append(source)
            continue
        Source.objects.filter(pk=source.pk).update(
            status=Source.Status.QUEUED, progress=0, error="", pending_version=F("pending_version") + 1,
            updated_at=timezone.now(),
        )
        result.queued.append(source)
    if prune:
        folders = [str(Path(p).expanduser().resolve()) for p in paths if Path(p).is_dir()]
        seen = {str(f) for f in files}
        for source in Source.objects.filter(collection=collection, kind__in=[Source.Kind.FILE, Source.Kind.FAQ]):
            if source.uri not in seen and any(source.uri.startswith(f + "/") for f in folders):
                source_delete(source)
                result.pruned += 1
    if enqueue:
        sources_enqueue((source.pk for source in result.queued), force=force)
    return result


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def pending_file_store(source: Source, name: str, content: File) -> None:
    """Make ``content`` the pending version of ``source`` (locked by the caller's transaction with
    ``select_for_update``; the caller saves it): stored under ``name`` in the source's storage (a
    file is copied in chunks, never read whole), ``pending_version`` raised so an ingestion of an
    older version still running stops without writing, and the replaced pending file deleted only
    when the transaction commits (a rollback leaves the row pointing at a file that still exists).
    The new file, stored while the old one still exists, gets a name of its own."""
    old = source.pending_file.name if source.pending_file else ""
    storage = source.pending_file.storage
    source.pending_file.save(name, content, save=False)
    source.pending_version += 1
    if old:
        transaction.on_commit(lambda: storage.delete(old))


def _locked_source(**lookup) -> Source:
    """The source of ``collection`` and ``uri`` in ``lookup`` (created with ``defaults`` when absent),
    locked until the caller's transaction ends, so concurrent uploads of one name queue one after the
    other and none leaves its file behind."""
    source, _ = Source.objects.get_or_create(**lookup)
    return Source.objects.select_for_update().get(pk=source.pk)


@transaction.atomic
def source_upload(*, filename: str, data: bytes | File, collection: str = DEFAULT_COLLECTION) -> Source:
    """Store an uploaded file as the pending version of source ``upload:<filename>`` and queue it.

    ``data``: the file's bytes, or a Django ``File`` (a request's ``UploadedFile``, streamed to
    storage in chunks). The serving version (if any) keeps answering until the new one is ready; an
    ingestion of an earlier upload still running is superseded (see ``pending_file_store``).
    Raises ``UploadRefused`` (nothing stored or changed) when the file is larger than
    ``INGEST_MAX_FILE_BYTES``. If storing the row fails, the file just stored is deleted again.
    """
    content = data if isinstance(data, File) else ContentFile(data)
    name = Path(filename).name or "upload"
    if content.size > settings.INGEST_MAX_FILE_BYTES:
        raise UploadRefused(f"{name}: {too_large_reason()}")
    source = _locked_source(
        collection=collection, uri=f"upload:{name}", defaults={"kind": _kind_for(name), "title": Path(name).stem}
    )
    pending_file_store(source, name, content)
    try:
        source.status, source.progress, source.error = Source.Status.QUEUED, 0, ""
        source.save()
        sources_enqueue([source.pk])
    except Exception:
        source.pending_file.storage.delete(source.pending_file.name)
        raise
    return source


@transaction.atomic
def source_delete(source: Source) -> None:
    """Delete ``source``, its chunks (cascade) and its pending upload file."""
    if source.pending_file:
        name, storage = source.pending_file.name, source.pending_file.storage
        transaction.on_commit(lambda: storage.delete(name))
    Product.objects.filter(source=source).update(source=None)
    _curated_retire_citing(source.pk, f"source {source.pk} was deleted")
    source.delete()


# --- products -----------------------------------------------------------------------------------


def product_markdown(product: Product) -> str:
    """Render ``product`` as the Markdown document that is ingested for it."""
    price = Decimal(product.price).quantize(Decimal("0.01"))
    lines = [f"# {product.name}", "", f"SKU: {product.sku}. Price: {price} {product.currency}."]
    if product.description.strip():
        lines += ["", product.description.strip()]
    if product.attributes:
        lines += ["", "## Specifications", ""]
        lines += [f"- {key}: {value}" for key, value in product.attributes.items()]
    return "\n".join(lines) + "\n"


@transaction.atomic
def product_sync(product: Product) -> Source:
    """Queue (re-)ingestion of ``product`` as the source ``product:<sku>`` of its collection.

    Call after saving a product; an unchanged rendering is skipped by ``document_ingest``. If the SKU
    or the collection changed, the source of the old SKU or collection is deleted.
    """
    uri = f"product:{product.sku}"
    if product.source_id and (product.source.uri != uri or product.source.collection != product.collection):
        source_delete(product.source)
        product.source = None
    source = _locked_source(
        collection=product.collection, uri=uri, defaults={"kind": Source.Kind.PRODUCT, "title": product.name}
    )
    pending_file_store(source, f"product-{product.sku}.md", ContentFile(product_markdown(product).encode()))
    source.title = product.name
    source.status, source.progress, source.error = Source.Status.QUEUED, 0, ""
    source.save()
    Product.objects.filter(pk=product.pk).update(source=source)
    product.source = source
    sources_enqueue([source.pk])
    return source


@transaction.atomic
def product_delete(product: Product) -> None:
    """Delete ``product`` and the source (and chunks) that made it retrievable."""
    if product.source_id:
        source_delete(product.source)
    product.delete()


# --- ingestion ----------------------------------------------------------------------------------


def _read_bytes(source: Source) -> tuple[str, bytes]:
    if source.pending_file:
        try:
            if source.pending_file.size > settings.INGEST_MAX_FILE_BYTES:
                raise SourceUnavailable(too_large_reason())  # not read into memory at all
            with source.pending_file.open("rb") as handle:
                return source.pending_file.name, handle.read()
        except OSError as error:
            raise SourceUnavailable(f"the uploaded file is missing ({error})") from None
    if source.uri.startswith(("upload:", "product:", "curated:")):
        raise SourceUnavailable("there is no pending file to ingest; upload the file again")
    path = Path(source.uri)
    try:
        if path.stat().st_size > settings.INGEST_MAX_FILE_BYTES:
            raise SourceUnavailable(too_large_reason())  # not read into memory at all
        return path.name, path.read_bytes()
    except OSError as error:
        raise SourceUnavailable(f"cannot read {path} ({error.strerror or error})") from None


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
        pk__in=ids, status__in=[Source.Status.QUEUED, Source.Status.PARSING, Source.Status.EMBEDDING]
    ).update(status=Source.Status.FAILED, error=reason, progress=0, updated_at=timezone.now())
    return ids


def _fail(claim: _Claim, reason: str) -> IngestResult:
    """Mark the claimed version failed with ``reason`` and delete its pending file (its bytes cannot
    be ingested; the admin uploads a corrected file). Raises ``_Superseded`` (nothing written) when a
    newer version was queued meanwhile."""
    with transaction.atomic():
        if not claim.rows().update(status=Source.Status.FAILED, error=reason, progress=0, pending_file="",
                                   updated_at=timezone.now()):
            raise _Superseded
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
    return _ingest_store(prepared, vectors)


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
    return [results[source_id] for source_id in dict.fromkeys(source_ids)]


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
    """Fail the claimed version with ``internal_error_reason(error)`` (logged with its traceback);
    ``"superseded"`` when a newer version was queued meanwhile."""
    logger.error("ingestion of source %s failed unexpectedly", claim.source_id, exc_info=error)
    try:
        return _fail(claim, internal_error_reason(error))
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
            _reembed_source(source_id, embedding_module.get_embedding_model(), embedding_module.model_id())
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
    current_model = embedding_module.model_id()
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
    """Embed ``texts`` (one unit vector per text, in their order: ``(len(texts), EMBEDDING_DIM)``)
    in batches of ``EMBEDDING_BATCH_SIZE`` texts of similar length, calling ``report(pct)`` (10..95)
    after each batch.

    The texts are sorted by length, longest first, before batching, as sentence-transformers'
    ``SentenceTransformer.encode`` sorts the texts of one call: a batch is padded to its longest
    text, so similar lengths waste the least. Encoding batch by batch keeps the progress moving
    (``knowledge.stuck_ingestions`` fails a source whose progress stalls).
    """
    batch = settings.EMBEDDING_BATCH_SIZE
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    vectors = np.zeros((len(texts), settings.EMBEDDING_DIM), dtype=np.float32)
    for offset in range(0, len(order), batch):
        picked = order[offset : offset + batch]
        vectors[picked] = model.encode([texts[i] for i in picked], batch_size=batch)
        report(10 + int(85 * min(len(texts), offset + batch) / max(len(texts), 1)))
    return vectors


def _swap_chunks(source: Source, chunks: list[Chunk], *, title: str) -> None:
    """Replace ``source``'s chunks with ``chunks`` (caller holds the transaction and the row lock).

    A new chunk whose text equals an old chunk's takes over that chunk's id (first come, first
    served among repeats), with its new offsets: citations, retrieval traces and corrections that
    name the id keep pointing at the same passage after a re-ingestion, wherever it now sits in the
    text. Chunks whose text changed get new ids; the old ones are deleted.
    """
    old_ids: dict[str, list[int]] = {}
    for pk, text in source.chunks.order_by("ordinal").values_list("pk", "text"):
        old_ids.setdefault(text, []).append(pk)
    source.chunks.all().delete()
    for chunk in chunks:
        chunk.source_id = source.pk
        reusable = old_ids.get(chunk.text)
        chunk.pk = reusable.pop(0) if reusable else None
    Chunk.objects.bulk_create(chunks, batch_size=500)
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


# --- curated answers ----------------------------------------------------------------------------


class CuratedAnswerError(ValueError):
    """A curated answer that cannot be stored as given (nothing is stored); the message says why."""


def embedding_text(source: Source, chunk: Chunk) -> str:
    """The text embedded for ``chunk`` of ``source``: the question alone for a curated answer (a new
    question is compared with the question it answers), else the passage with its title and headings
    (``embedding.passage_text``)."""
    if source.kind == Source.Kind.CURATED:
        return source.curated.question
    return embedding_module.passage_text(source.title, chunk.heading_path, chunk.text)


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
                  embedding_model=embedding_module.model_id())
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


# --- re-embedding -------------------------------------------------------------------------------


@dataclass
class ReembedResult:
    """Sources whose chunks were re-embedded, and chunks written."""

    sources: int = 0
    chunks: int = 0


def reembed(*, collection: str | None = None, everything: bool = False,
            report: Callable[[int, int], None] | None = None) -> ReembedResult:
    """Re-embed chunks written by another embedding model (or all chunks with ``everything``).

    Chunks keep their text and offsets; only vectors change. Each source is swapped in its own
    transaction, so old vectors serve until its new ones commit. If ``EMBEDDING_DIM`` differs from
    the stored column's dimension, every chunk is re-embedded first and the column and its HNSW index
    are rebuilt in one transaction (searches wait for it, they never see a mix).
    ``report(done, total)`` is called after each source.
    """
    current = embedding_module.model_id()
    model = embedding_module.get_embedding_model()
    if _stored_vector_dimension() != settings.EMBEDDING_DIM:
        return _reembed_new_dimension(model, current, report)
    sources = Source.objects.filter(chunk_count__gt=0)
    if collection:
        sources = sources.filter(collection=collection)
    if not everything:
        sources = sources.filter(pk__in=Chunk.objects.exclude(embedding_model=current).values("source_id"))
    sources = list(sources.order_by("pk"))
    result = ReembedResult()
    for index, source in enumerate(sources, start=1):
        result.chunks += _reembed_source(source.pk, model, current)
        result.sources += 1
        if report:
            report(index, len(sources))
    return result


@transaction.atomic
def _reembed_source(source_id: int, model, current: str) -> int:
    """Re-embed one source's chunks in place (one transaction); returns the number of chunks."""
    locked = Source.objects.select_for_update().get(pk=source_id)
    chunks = list(locked.chunks.order_by("ordinal"))
    texts = [embedding_text(locked, c) for c in chunks]
    for chunk, vector in zip(chunks, model.encode(texts)):
        chunk.embedding, chunk.embedding_model = vector, current
    Chunk.objects.bulk_update(chunks, ["embedding", "embedding_model"], batch_size=500)
    return len(chunks)


def _stored_vector_dimension() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'knowledge_chunk'::regclass "
            "AND attname = 'embedding'"
        )
        return cursor.fetchone()[0]


def _reembed_new_dimension(model, current: str, report) -> ReembedResult:
    rows = list(Chunk.objects.select_related("source").order_by("pk"))
    texts = [embedding_text(c.source, c) for c in rows]
    vectors = model.encode(texts)
    dim = int(settings.EMBEDDING_DIM)
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
            "(embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
        )
    sources = len({c.source_id for c in rows})
    if report:
        report(sources, sources)
    return ReembedResult(sources=sources, chunks=len(rows))
