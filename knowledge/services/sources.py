"""Registering sources: files and folders on disk (``sources_register_paths``), uploads
(``sources_upload``, ``source_upload``, ``pending_file_store``), deleting a source, and queueing ingestion tasks when the
transaction commits (``sources_enqueue``).

A source can be re-uploaded while an older version is still being ingested: each stored version
raises ``Source.pending_version`` (see ``knowledge.services.ingestion`` for how an ingestion of an
older version then stops), and a replaced pending file is deleted only once the transaction that
replaced it commits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from config.task_queue import task_enqueue_on_commit
from knowledge.models import DEFAULT_COLLECTION, Product, Source
from knowledge.services.curated import _curated_retire_citing
from knowledge.services.ingestion import too_large_reason
from knowledge.services.lexemes import lexeme_frequencies_refresh


class UploadRefused(ValueError):
    """An upload that is not stored (larger than ``INGEST_MAX_FILE_BYTES``); the message says why."""


def sources_enqueue(source_ids: Iterable[int], *, force: bool = False) -> None:
    """Queue ingestion of ``source_ids`` when the current transaction commits: one
    ``knowledge.ingest_source`` task for a single source, else ``knowledge.ingest_sources`` tasks of
    at most ``INGEST_TASK_SOURCES`` sources each (their chunks are embedded together). ``force`` as
    in ``document_ingest``.

    When the task queue is unreachable (``config.task_queue``), the sources of a task not sent stay
    ``queued`` and are marked unsent (``unsent_at``, ``unsent_force``); ``sources_send_unsent`` (Celery
    beat) sends them once it is back. Nothing raises."""
    from knowledge.tasks import ingest_source, ingest_sources

    ids = list(source_ids)
    if len(ids) == 1:
        groups, task = [ids], ingest_source
    else:
        size = max(1, settings.INGEST_TASK_SOURCES)
        groups, task = [ids[offset : offset + size] for offset in range(0, len(ids), size)], ingest_sources
    for group in groups:
        task_enqueue_on_commit(task, (group[0] if task is ingest_source else group,), {"force": force},
                               on_unsent=partial(_sources_mark_unsent, group, force),
                               later="the ingestion starts when the queue is back")


def _sources_mark_unsent(source_ids: list[int], force: bool) -> None:
    """Mark the still-queued sources of ``source_ids`` unsent (a forced ingestion stays forced)."""
    Source.objects.filter(pk__in=source_ids, status=Source.Status.QUEUED).update(
        unsent_at=timezone.now(), **({"unsent_force": True} if force else {}))


def sources_send_unsent() -> int:
    """Send again the ingestion of every source marked unsent (``sources_enqueue``) that is still
    queued, forced ones with ``force``; clear the mark on the others. Returns how many were sent (or
    marked unsent again: the queue may still be down). Safe to run concurrently: each mark is taken
    by one conditional update."""
    Source.objects.filter(unsent_at__isnull=False).exclude(status=Source.Status.QUEUED).update(
        unsent_at=None, unsent_force=False)
    sent = 0
    for force in (False, True):
        with transaction.atomic():
            ids = list(Source.objects.select_for_update(skip_locked=True)
                       .filter(unsent_at__isnull=False, unsent_force=force, status=Source.Status.QUEUED)
                       .values_list("pk", flat=True))
            if ids:
                Source.objects.filter(pk__in=ids).update(unsent_at=None, unsent_force=False)
                sources_enqueue(ids, force=force)
        sent += len(ids)
    return sent


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
        result.pruned += sources_delete(
            source for source in Source.objects.filter(collection=collection, kind__in=[Source.Kind.FILE, Source.Kind.FAQ])
            if source.uri not in seen and any(source.uri.startswith(f + "/") for f in folders))
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
    The new file, stored while the old one still exists, gets a name of its own, except in a storage
    that writes over an existing name (django-storages' ``S3Storage`` with its default
    ``file_overwrite=True``): there the new file took the old one's place and is not deleted."""
    old = source.pending_file.name if source.pending_file else ""
    storage = source.pending_file.storage
    source.pending_file.save(name, content, save=False)
    source.pending_version += 1
    if old and old != source.pending_file.name:
        transaction.on_commit(lambda: storage.delete(old))


def _locked_source(**lookup) -> Source:
    """The source of ``collection`` and ``uri`` in ``lookup`` (created with ``defaults`` when absent),
    locked until the caller's transaction ends, so concurrent uploads of one name queue one after the
    other and none leaves its file behind."""
    source, _ = Source.objects.get_or_create(**lookup)
    return Source.objects.select_for_update().get(pk=source.pk)


@transaction.atomic
def source_upload(*, filename: str, data: bytes | File, collection: str = DEFAULT_COLLECTION) -> Source:
    """Store an uploaded file as the pending version of source ``upload:<filename>`` and queue it
    (one file: ``sources_upload`` with a single file).

    ``data``: the file's bytes, or a Django ``File`` (a request's ``UploadedFile``, streamed to
    storage in chunks). The serving version (if any) keeps answering until the new one is ready; an
    ingestion of an earlier upload still running is superseded (see ``pending_file_store``).
    Raises ``UploadRefused`` (nothing stored or changed) when the file is larger than
    ``INGEST_MAX_FILE_BYTES``. If storing the row fails, the file just stored is deleted again.
    """
    return sources_upload([(filename, data)], collection=collection)[0]


@transaction.atomic
def sources_upload(files: Iterable[tuple[str, bytes | File]], *, collection: str = DEFAULT_COLLECTION) -> list[Source]:
    """Store uploaded files as the pending versions of sources ``upload:<filename>`` and queue them
    together when the transaction commits (``sources_enqueue``: several files go to
    ``knowledge.ingest_sources`` tasks, their chunks embedded in shared rounds, each file still
    swapped in alone and failing alone), as the admin's upload page does.

    ``files``: ``(filename, data)`` pairs, ``data`` as in ``source_upload``. Returns the sources in
    the order of ``files``. Raises ``UploadRefused`` naming the first file larger than
    ``INGEST_MAX_FILE_BYTES`` before anything is stored (a submission is stored whole or not at
    all). If storing fails, the files already stored by this call are deleted again.
    """
    contents = [(Path(filename).name or "upload", data if isinstance(data, File) else ContentFile(data))
                for filename, data in files]
    for name, content in contents:
        if content.size > settings.INGEST_MAX_FILE_BYTES:
            raise UploadRefused(f"{name}: {too_large_reason()}")
    stored: list[Source] = []
    try:
        for name, content in contents:
            source = _locked_source(
                collection=collection, uri=f"upload:{name}", defaults={"kind": _kind_for(name), "title": Path(name).stem}
            )
            pending_file_store(source, name, content)
            stored.append(source)
            source.status, source.progress, source.error = Source.Status.QUEUED, 0, ""
            source.save()
        sources_enqueue(dict.fromkeys(source.pk for source in stored))
    except Exception:
        for source in stored:
            source.pending_file.storage.delete(source.pending_file.name)
        raise
    return stored


@transaction.atomic
def source_delete(source: Source) -> None:
    """Delete ``source``, its chunks (cascade) and its pending upload file, and recompute its
    collection's lexeme document frequencies (``sources_delete`` of one)."""
    sources_delete([source])


@transaction.atomic
def sources_delete(sources: Iterable[Source]) -> int:
    """Delete every source of ``sources`` as ``source_delete`` does, in one transaction, recomputing
    the lexeme document frequencies of each affected collection once at the end (about a second per
    refresh of a 100k-chunk collection, so a bulk delete does not pay it per source). Returns how
    many were deleted."""
    changed: set[str] = set()
    count = 0
    for source in sources:
        if source.pending_file:
            name, storage = source.pending_file.name, source.pending_file.storage
            transaction.on_commit(lambda name=name, storage=storage: storage.delete(name))
        Product.objects.filter(source=source).update(source=None)
        _curated_retire_citing(source.pk, f"source {source.pk} was deleted")
        if source.chunk_count > 0 or source.chunks.exists():
            changed.add(source.collection)
        source.delete()
        count += 1
    if changed:
        lexeme_frequencies_refresh(sorted(changed))
    return count
