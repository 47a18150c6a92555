"""Embedding-model versions: register a candidate, re-embed the knowledge base into its shadow
vectors while the active version keeps serving, and switch every process to it (or back) at once.

Blue/green vectors (``knowledge.models.EmbeddingModelVersion``, ``ChunkEmbedding``):

- ``Chunk.embedding`` always holds the active version's vectors, so serving's hot path
  (``knowledge.selectors.chunk_search``: the chunk table's HNSW index) is the same whichever version
  is active. Non-active versions' vectors live in ``ChunkEmbedding`` (a dimensionless ``vector``
  column; a candidate gets a partial expression HNSW index of its own dimension, built once its
  vectors are written, so a 100k-chunk knowledge base is searched through the index).
- ``embedding_version_register`` records a candidate (``building``); ``embedding_version_build``
  embeds every chunk lacking its vector in batches (resumable: a second call continues where the
  first stopped), records progress and a heartbeat, builds the index, then does a final catch-up of
  chunks written meanwhile under the vectors lock and marks it ``ready``. A half-built shadow never
  serves: only ``active`` vectors are in ``Chunk.embedding``. A build whose worker died is failed by
  ``embedding_versions_fail_stale`` (its shadow vectors dropped); serving never noticed it.
- Ingestion during a build lands in both: every chunk swap (``knowledge.services.chunks``) takes
  the vectors lock in shared mode, re-embeds with the active version anything embedded by another
  one (a promotion in between), and writes the candidates' vectors (``shadow_embeddings_write``);
  deleted chunks take their shadow vectors with them (cascade).
- ``embedding_version_activate`` (promotion, and rollback to a retired version) runs in ONE
  transaction under the vectors lock (a Postgres advisory lock, exclusive): the active vectors are
  copied into ``ChunkEmbedding`` as the outgoing version's (kept for rollback), the target's vectors
  are written into ``Chunk.embedding`` / ``embedding_model`` (for another dimension, the column and
  its HNSW index are rebuilt as ``reembed`` does, readers waiting on the table lock), and the statuses
  flip. Readers (``chunk_search``) read the active version and the chunks in one snapshot, so they
  see the old version or the new one, never a mix; each process's query encoder follows the active
  row (``knowledge.embedding.get_embedding_model``). ``embedding_version_rollback`` activates the
  version the last promotion retired, from its kept vectors: only chunks written since are embedded.

Promotion and rollback run in a worker, not in the request that asks for them (at 100k chunks the
copy is minutes): ``embedding_version_promotion_request`` / ``embedding_version_rollback_request``
mark the target ``promoting`` (a compare-and-set; one at a time) and queue the Celery task
``knowledge.activate_embedding_version``, which runs ``embedding_version_promotion_run``; a failed
switch puts the target back with the reason, the active version serving throughout, and the stale
sweep (``embedding_versions_fail_stale``) puts back a request whose worker never ran it or died.

Only the latest retired version keeps its vectors (a promotion drops older ones' copies), so the
storage is at most twice the vectors (three while a candidate builds).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Callable

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from config.task_queue import task_enqueue_on_commit, unsent_reason
from knowledge import embedding as embedding_module
from knowledge.models import HNSW_EF_CONSTRUCTION, HNSW_M, Chunk, ChunkEmbedding, EmbeddingModelVersion, Source

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key of the vectors lock ("embv"): exclusive for an activation and a build's
# final catch-up, shared for every chunk swap.
VECTORS_LOCK_KEY = 0x656D6276

Status = EmbeddingModelVersion.Status


class EmbeddingVersionError(Exception):
    """A version cannot be registered, built or activated (the reason in the message); nothing changed."""


def vectors_lock_shared() -> None:
    """Take the vectors lock in shared mode until the end of the caller's transaction: no activation
    runs while chunks are written (several writers at once are fine)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock_shared(%s)", [VECTORS_LOCK_KEY])


def _vectors_lock_exclusive() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [VECTORS_LOCK_KEY])


def embedding_version_bootstrap() -> EmbeddingModelVersion:
    """The active version's row; when none exists (a fresh install, before the first candidate),
    registers the settings' model (``EMBEDDING_MODEL``, ``EMBEDDING_MODEL_NAME``, ``EMBEDDING_DIM``)
    as the first active version, with its folder's SHA-256 (empty for a hub name). Atomic; joins the
    caller's transaction."""
    with transaction.atomic():
        _vectors_lock_exclusive()
        active = EmbeddingModelVersion.objects.filter(status=Status.ACTIVE).first()
        if active is not None:
            return active
        path = Path(settings.EMBEDDING_MODEL)
        now = timezone.now()
        version, created = EmbeddingModelVersion.objects.get_or_create(
            name=settings.EMBEDDING_MODEL_NAME,
            defaults={"path": str(path), "dimension": int(settings.EMBEDDING_DIM), "status": Status.ACTIVE,
                      "sha256": embedding_module.folder_sha256(path) if path.exists() else "",
                      "note": "the settings' model (EMBEDDING_MODEL)", "progress": 1.0, "promoted_at": now})
        if not created:  # registered before, then left without an active version: it serves again
            version.status, version.promoted_at = Status.ACTIVE, now
            version.save(update_fields=["status", "promoted_at"])
        return version


def embedding_version_register(*, name: str, path: str | Path, dimension: int | None = None,
                               note: str = "") -> EmbeddingModelVersion:
    """Record the sentence-transformers folder ``path`` as candidate version ``name`` (``building``,
    no vectors yet), with its files' SHA-256 and vector ``dimension`` (read from the model when not
    given). Registers the settings' model first if no version exists.

    Raises ``EmbeddingVersionError`` when the folder is missing or the name is taken.
    """
    folder = Path(path)
    if not folder.exists():
        raise EmbeddingVersionError(f"embedding model folder not found: {folder}")
    if dimension is None:
        from sentence_transformers import SentenceTransformer

        dimension = SentenceTransformer(str(folder), device=settings.EMBEDDING_DEVICE).get_embedding_dimension()
    digest = embedding_module.folder_sha256(folder)
    with transaction.atomic():
        embedding_version_bootstrap()
        if EmbeddingModelVersion.objects.filter(name=name).exists():
            raise EmbeddingVersionError(f"an embedding version named {name!r} exists")
        return EmbeddingModelVersion.objects.create(
            name=name, path=str(folder), sha256=digest, dimension=int(dimension), status=Status.BUILDING,
            note=note[:300], chunks_total=Chunk.objects.count(), heartbeat_at=timezone.now())


def _checked_encoder(version: EmbeddingModelVersion) -> embedding_module.EmbeddingModel:
    """The process's encoder of ``version`` after checking its folder against the recorded SHA-256.
    Raises ``EmbeddingVersionError`` when the folder is gone or changed."""
    if version.sha256:
        try:
            digest = embedding_module.folder_sha256(version.path)
        except FileNotFoundError:
            raise EmbeddingVersionError(f"the model folder of {version.model_id} is gone: {version.path}") from None
        if digest != version.sha256:
            raise EmbeddingVersionError(f"the model folder of {version.model_id} changed since it was registered "
                                        f"(sha256 {digest[:12]} != {version.sha256[:12]})")
    return embedding_module.encoder_for(embedding_module.version_embedding(version))


def _texts_of(chunk_ids: list[int]) -> tuple[list[int], list[str]]:
    """The ids (of those still present) and embedded texts (``embedding_text``) of ``chunk_ids``."""
    from knowledge.services.reembedding import embedding_text

    rows = (Chunk.objects.filter(pk__in=chunk_ids).select_related("source", "source__curated")
            .defer("embedding", "search_vector", "source__text").order_by("pk"))
    found = list(rows)
    return [c.pk for c in found], [embedding_text(c.source, c) for c in found]


def _shadow_insert(version_id: int, chunk_ids: list[int], vectors, *, overwrite: bool) -> int:
    """Store ``vectors[i]`` as chunk ``chunk_ids[i]``'s vector under ``version_id``; a chunk deleted
    meanwhile is skipped. ``overwrite``: replace a stored one (ingestion's fresh vectors); else keep
    it (a build's vector may be older than ingestion's). Returns rows written."""
    if not chunk_ids:
        return 0
    literals = ["[" + ",".join(f"{float(x):.7g}" for x in vector) + "]" for vector in vectors]
    conflict = "DO UPDATE SET embedding = EXCLUDED.embedding" if overwrite else "DO NOTHING"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO knowledge_chunkembedding (chunk_id, version_id, embedding)
            SELECT v.chunk_id, %s, v.embedding::vector
            FROM unnest(%s::bigint[], %s::text[]) AS v(chunk_id, embedding)
            JOIN knowledge_chunk c ON c.id = v.chunk_id
            ON CONFLICT (version_id, chunk_id) {conflict}
            """,
            [version_id, list(chunk_ids), literals],
        )
        return cursor.rowcount


def _missing_chunk_ids(version_id: int, *, after: int = 0, limit: int | None = None) -> list[int]:
    """Ids of chunks without a vector under ``version_id``, ascending, above ``after``."""
    missing = (Chunk.objects.filter(pk__gt=after)
               .filter(~Exists(ChunkEmbedding.objects.filter(version_id=version_id, chunk_id=OuterRef("pk"))))
               .order_by("pk").values_list("pk", flat=True))
    return list(missing[:limit] if limit else missing)


def _embed_missing(version: EmbeddingModelVersion, encoder, *, batch: int,
                   on_batch: Callable[[int], None] | None = None) -> int:
    """Embed, ``batch`` chunks per encode call, every chunk lacking ``version``'s vector (in id order)
    and store them; ``on_batch(written)`` after each batch. Returns chunks written."""
    written, after = 0, 0
    while True:
        ids = _missing_chunk_ids(version.pk, after=after, limit=batch)
        if not ids:
            return written
        after = ids[-1]
        present, texts = _texts_of(ids)
        if present:
            vectors = encoder.encode(texts)
            try:
                with transaction.atomic():  # a savepoint inside the caller's transaction
                    written += _shadow_insert(version.pk, present, vectors, overwrite=False)
            except IntegrityError:  # a chunk deleted between the read and the insert: take the batch again
                after = ids[0] - 1
                continue
        if on_batch:
            on_batch(written)


def _check_deferred_constraints(cursor) -> None:
    """Run the transaction's pending (deferred) foreign-key checks now: Postgres refuses DDL on a
    table with pending trigger events, and Django's foreign keys are ``DEFERRABLE INITIALLY DEFERRED``."""
    if connection.in_atomic_block:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")


def _create_shadow_index(version: EmbeddingModelVersion) -> None:
    """The partial expression HNSW index of ``version``'s vectors (cosine, the chunk index's m and
    ef_construction), built concurrently when outside a transaction (ingestion keeps writing)."""
    concurrently = "" if connection.in_atomic_block else "CONCURRENTLY"
    with connection.cursor() as cursor:
        _check_deferred_constraints(cursor)
        cursor.execute(
            f"CREATE INDEX {concurrently} IF NOT EXISTS {version.index_name} ON knowledge_chunkembedding "
            f"USING hnsw ((embedding::vector({int(version.dimension)})) vector_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) WHERE version_id = {int(version.pk)}"
        )


def _drop_shadow(version_id: int, index_name: str) -> None:
    with connection.cursor() as cursor:
        _check_deferred_constraints(cursor)
        cursor.execute(f"DROP INDEX IF EXISTS {index_name}")
    ChunkEmbedding.objects.filter(version_id=version_id).delete()


def embedding_version_build(version_id: int, *, batch_size: int | None = None,
                            on_progress: Callable[[float], None] | None = None) -> EmbeddingModelVersion:
    """Re-embed the knowledge base into ``version_id``'s shadow vectors (it must be ``building``):
    every chunk lacking one, ``batch_size`` (default ``EMBEDDING_VERSION_BUILD_BATCH``) per encode
    call, progress and heartbeat written after each batch (``on_progress(share)`` too); then its
    HNSW index; then, under the vectors lock (no chunk swap meanwhile), a catch-up of chunks written
    since, and the version is marked ``ready``. Resumable: calling it again after a crash continues
    with the missing chunks. Returns the version.

    Raises ``EmbeddingVersionError`` when the version is not building (failed by the stale check,
    or cancelled: the build stops at its next batch) or its folder is gone or changed. The active
    version and ``Chunk.embedding`` are never touched.
    """
    version = EmbeddingModelVersion.objects.get(pk=version_id)
    if version.status != Status.BUILDING:
        raise EmbeddingVersionError(f"{version.model_id} is {version.status}, not building")
    encoder = _checked_encoder(version)
    batch = max(int(batch_size or settings.EMBEDDING_VERSION_BUILD_BATCH), 1)
    total = max(Chunk.objects.count(), 1)
    done_before = ChunkEmbedding.objects.filter(version_id=version.pk).count()

    def report(written: int) -> None:
        done = done_before + written
        share = min(done / total, 1.0)
        if not EmbeddingModelVersion.objects.filter(pk=version.pk, status=Status.BUILDING).update(
                progress=share, chunks_done=done, chunks_total=total, heartbeat_at=timezone.now()):
            raise EmbeddingVersionError(f"{version.model_id} stopped building (failed or cancelled)")
        if on_progress:
            on_progress(share)

    report(0)
    _embed_missing(version, encoder, batch=batch, on_batch=report)
    _create_shadow_index(version)
    with transaction.atomic():
        _vectors_lock_exclusive()
        caught_up = _embed_missing(version, encoder, batch=batch)
        done = ChunkEmbedding.objects.filter(version_id=version.pk).count()
        now = timezone.now()
        if not EmbeddingModelVersion.objects.filter(pk=version.pk, status=Status.BUILDING).update(
                status=Status.READY, progress=1.0, chunks_done=done, chunks_total=Chunk.objects.count(),
                heartbeat_at=now, ready_at=now, reason=""):
            raise EmbeddingVersionError(f"{version.model_id} stopped building (failed or cancelled)")
    logger.info("embedding version %s ready (%s chunks, %s in the final catch-up)", version.model_id, done, caught_up)
    version.refresh_from_db()
    return version


def embedding_version_fail(version_id: int, reason: str, *, status: str = Status.FAILED) -> bool:
    """Mark a ``building`` or ``ready`` version ``failed`` (or ``rejected``: the gate refused it) with
    ``reason`` and drop its shadow vectors and index (serving never read them). Returns whether it was
    changed (a compare-and-set: an active or retired version is left alone)."""
    with transaction.atomic():
        version = EmbeddingModelVersion.objects.select_for_update().filter(pk=version_id).first()
        if version is None or version.status not in EmbeddingModelVersion.CANDIDATE_STATUSES:
            return False
        EmbeddingModelVersion.objects.filter(pk=version_id).update(status=status, reason=reason[:4000])
        _drop_shadow(version.pk, version.index_name)
    return True


def embedding_version_reject(version_id: int, reason: str) -> bool:
    """The promotion gate refused candidate ``version_id``: ``rejected`` with ``reason``, its shadow
    vectors dropped (ingestion stops embedding for it). Returns whether it was changed."""
    return embedding_version_fail(version_id, reason, status=Status.REJECTED)


def embedding_versions_fail_stale(now=None) -> int:
    """Fail every ``building`` version whose builder has not reported (``heartbeat_at``) for
    ``EMBEDDING_VERSION_STALE_S`` seconds (a killed worker), dropping its shadow vectors; and put back
    every ``promoting`` version whose switch has not reported for as long and is not under way (the
    vectors lock is free: no switch is in its transaction), to the status it had, with the reason.
    The active version kept serving all along. Returns how many."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.EMBEDDING_VERSION_STALE_S)
    count = 0
    for version in EmbeddingModelVersion.objects.filter(status=Status.BUILDING, heartbeat_at__lt=cutoff):
        count += embedding_version_fail(version.pk, f"the re-embedding stopped reporting (no heartbeat since "
                                                    f"{version.heartbeat_at:%Y-%m-%d %H:%M:%S}); the active version "
                                                    "kept serving")
    for version in EmbeddingModelVersion.objects.filter(status=Status.PROMOTING, heartbeat_at__lt=cutoff):
        with transaction.atomic(), connection.cursor() as cursor:
            if _promotion_under_way(cursor):  # the switch's transaction (no heartbeat inside it) or chunk writes
                continue
            count += embedding_version_promotion_restore(
                version.pk, f"the promotion did not run or stopped reporting (no heartbeat since "
                            f"{version.heartbeat_at:%Y-%m-%d %H:%M:%S}); the active version kept serving; "
                            "promote it again")
    return count


def chunk_vectors_prepare(source: Source, chunks: list[Chunk], *, title: str) -> None:
    """Before ``chunks`` of ``source`` are written (caller holds the transaction): take the vectors
    lock in shared mode and re-embed, with the active version, the chunks whose ``embedding_model``
    is not the active version's (embedded before a promotion that committed since), so
    ``Chunk.embedding`` only ever holds the active version's vectors."""
    vectors_lock_shared()
    active = embedding_module.active_embedding()
    stale = [c for c in chunks if c.embedding_model != active.model_id]
    if not stale:
        return
    encoder = embedding_module.encoder_for(active)
    vectors = encoder.encode([_chunk_text(source, c, title) for c in stale])
    for chunk, vector in zip(stale, vectors):
        chunk.embedding, chunk.embedding_model = vector, active.model_id


def _chunk_text(source: Source, chunk: Chunk, title: str) -> str:
    """What is embedded for ``chunk`` about to be written under ``title``: the question (the title)
    for a curated answer, else the passage with its title and headings."""
    if source.kind == Source.Kind.CURATED:
        return title
    return embedding_module.passage_text(title, chunk.heading_path, chunk.text)


def shadow_embeddings_write(source: Source, chunks: list[Chunk], *, title: str) -> int:
    """After ``chunks`` of ``source`` were written (with their ids; caller holds the transaction and
    the vectors lock from ``chunk_vectors_prepare``): store their vectors under every candidate version
    (``building`` or ``ready``, or ``promoting``: its switch is queued), embedded with its encoder. A candidate whose folder this process
    cannot load is skipped with a warning (its build's catch-up, or the promotion's, embeds them).
    Returns rows written."""
    candidates = list(EmbeddingModelVersion.objects.filter(status__in=EmbeddingModelVersion.SHADOW_STATUSES))
    if not candidates or not chunks:
        return 0
    texts = [_chunk_text(source, c, title) for c in chunks]
    written = 0
    for version in candidates:
        try:
            encoder = embedding_module.encoder_for(embedding_module.version_embedding(version))
        except Exception as error:  # noqa: BLE001 - an unreadable candidate must not fail ingestion
            logger.warning("source %s: not embedded for candidate %s (%s); its catch-up will", source.pk,
                           version.model_id, error)
            continue
        written += _shadow_insert(version.pk, [c.pk for c in chunks], encoder.encode(texts), overwrite=True)
    return written


def _switch_column_dimension(cursor, dimension: int) -> None:
    """Empty ``Chunk.embedding`` into ``vector(dimension)`` without its HNSW index (the table locked
    ACCESS EXCLUSIVE until the caller's transaction ends: readers wait, then see the new version)."""
    cursor.execute("LOCK TABLE knowledge_chunk IN ACCESS EXCLUSIVE MODE")
    cursor.execute("DROP INDEX IF EXISTS chunk_embedding_hnsw")
    cursor.execute("ALTER TABLE knowledge_chunk ALTER COLUMN embedding DROP NOT NULL")
    cursor.execute(f"ALTER TABLE knowledge_chunk ALTER COLUMN embedding TYPE vector({int(dimension)}) USING NULL")


def _stored_dimension(cursor) -> int:
    cursor.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = 'knowledge_chunk'::regclass "
                   "AND attname = 'embedding'")
    return int(cursor.fetchone()[0])


def embedding_version_activate(version_id: int, *, note: str = "", claimed: bool = False,
                               before_switch: Callable[[], None] | None = None,
                               on_progress: Callable[[], None] | None = None) -> EmbeddingModelVersion:
    """Make ``version_id`` (``ready``, or ``retired`` for a rollback) the active version for every
    process, atomically (see the module docstring): its vectors become ``Chunk.embedding``, the
    outgoing active version's are kept as its shadow vectors, statuses flip. Chunks lacking the
    target's vector (written since it was built or retired) are embedded first, the last few under
    the lock. ``note`` is recorded as the version's ``reason``. Returns the activated version.

    Synchronous: at 100k chunks the copy is one ``UPDATE`` of every chunk (minutes), so requests do
    not call it; they queue ``embedding_version_promotion_request`` and a worker runs it through
    ``embedding_version_promotion_run`` (which passes ``claimed=True``: the version must then be
    ``promoting``, the status the request set). ``before_switch()`` runs inside the switch's
    transaction, after the lock (a caller's last check; raising aborts the switch, nothing changed);
    ``on_progress()`` after each batch of the catch-up embedding before the lock (a heartbeat).

    Raises ``EmbeddingVersionError`` (nothing changed) when the version is not ready / retired (not
    promoting, when ``claimed``), is already active, or its folder is gone or changed (the reason is
    recorded on it).
    """
    allowed = (Status.PROMOTING,) if claimed else EmbeddingModelVersion.ACTIVATABLE_STATUSES

    def refused(version: EmbeddingModelVersion, meanwhile: bool = False) -> EmbeddingVersionError:
        if meanwhile:
            return EmbeddingVersionError(f"{version.model_id} became {version.status} meanwhile")
        if claimed:
            return EmbeddingVersionError(f"{version.model_id} is {version.status}, not promoting")
        return EmbeddingVersionError(f"{version.model_id} is {version.status}; only a ready or retired version "
                                     "can be activated")

    version = EmbeddingModelVersion.objects.get(pk=version_id)
    if version.status not in allowed:
        raise refused(version)
    try:
        encoder = _checked_encoder(version)
    except EmbeddingVersionError as error:
        EmbeddingModelVersion.objects.filter(pk=version.pk).update(reason=str(error))
        raise
    batch = max(int(settings.EMBEDDING_VERSION_BUILD_BATCH), 1)
    # Outside the lock: ingestion goes on meanwhile.
    _embed_missing(version, encoder, batch=batch, on_batch=(lambda _written: on_progress()) if on_progress else None)
    if on_progress:
        on_progress()
    with transaction.atomic(), connection.cursor() as cursor:
        _vectors_lock_exclusive()
        version = EmbeddingModelVersion.objects.select_for_update().get(pk=version_id)
        if version.status not in allowed:
            raise refused(version, meanwhile=True)
        if before_switch:
            before_switch()
        outgoing = embedding_version_bootstrap()
        _embed_missing(version, encoder, batch=batch)  # chunks swapped in since the pass above
        # The outgoing version's vectors are kept (rollback needs no re-embedding); older copies go.
        for old in EmbeddingModelVersion.objects.filter(status=Status.RETIRED).exclude(pk=version.pk):
            _drop_shadow(old.pk, old.index_name)
        cursor.execute(
            "INSERT INTO knowledge_chunkembedding (chunk_id, version_id, embedding) "
            "SELECT id, %s, embedding::vector FROM knowledge_chunk "
            "ON CONFLICT (version_id, chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding",
            [outgoing.pk],
        )
        new_dimension = _stored_dimension(cursor) != int(version.dimension)
        if new_dimension:
            _check_deferred_constraints(cursor)
            _switch_column_dimension(cursor, version.dimension)
        cursor.execute(
            "UPDATE knowledge_chunk c SET embedding = e.embedding, embedding_model = %s "
            "FROM knowledge_chunkembedding e WHERE e.chunk_id = c.id AND e.version_id = %s",
            [version.model_id, version.pk],
        )
        if new_dimension:
            _check_deferred_constraints(cursor)
            cursor.execute("ALTER TABLE knowledge_chunk ALTER COLUMN embedding SET NOT NULL")
            cursor.execute(
                "CREATE INDEX chunk_embedding_hnsw ON knowledge_chunk USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")
        _drop_shadow(version.pk, version.index_name)  # its vectors are Chunk.embedding now
        now = timezone.now()
        EmbeddingModelVersion.objects.filter(pk=outgoing.pk).update(status=Status.RETIRED, retired_at=now)
        EmbeddingModelVersion.objects.filter(pk=version.pk).update(
            status=Status.ACTIVE, promoted_at=now, retired_at=None, progress=1.0, reason=note[:4000],
            promoting_from="", heartbeat_at=now)
    logger.info("embedding version %s active (was %s)", version.model_id, outgoing.model_id)
    version.refresh_from_db()
    return version


def embedding_version_promotion_request(version_id: int, *, note: str = "", enqueue: bool = True
                                        ) -> EmbeddingModelVersion:
    """Ask for ``version_id`` (``ready``, or ``retired``: a rollback) to become the active version, in a
    worker: a compare-and-set marks it ``promoting`` (remembering its status in ``promoting_from``,
    ``promotion_requested_at`` and ``heartbeat_at`` now) and, with ``enqueue``, the Celery task
    ``knowledge.activate_embedding_version`` is sent once the transaction commits (default queue,
    ``config.task_queue.task_enqueue_on_commit``). ``note`` becomes the version's ``reason`` once it is
    active. Returns the version (``promoting``). Nothing is served differently until the worker's
    switch commits; the active version serves meanwhile.

    When the task queue is unreachable, the version goes back to its status with
    ``unsent_reason("promotion")`` as its reason (nothing else changed).

    Raises ``EmbeddingVersionError`` (nothing changed) when the version is not ready or retired
    (already promoting, active, building...) or another version is being promoted (at most one at a
    time, a partial unique index). Raises ``EmbeddingModelVersion.DoesNotExist`` for an unknown id.
    """
    version = EmbeddingModelVersion.objects.get(pk=version_id)
    if version.status not in EmbeddingModelVersion.ACTIVATABLE_STATUSES:
        raise EmbeddingVersionError(f"{version.model_id} is {version.status}; only a ready or retired version "
                                    "can be promoted")
    now = timezone.now()
    try:
        with transaction.atomic():
            claimed = EmbeddingModelVersion.objects.filter(pk=version.pk, status=version.status).update(
                status=Status.PROMOTING, promoting_from=version.status, promotion_requested_at=now, heartbeat_at=now)
            if not claimed:  # another request won between the read and the update
                current = EmbeddingModelVersion.objects.get(pk=version.pk)
                raise EmbeddingVersionError(f"{version.model_id} is {current.status}; only a ready or retired "
                                            "version can be promoted")
            if enqueue:
                from knowledge.tasks import activate_embedding_version

                def unsent() -> None:
                    embedding_version_promotion_restore(version.pk, unsent_reason("promotion"))

                task_enqueue_on_commit(activate_embedding_version, (version.pk,), {"note": note[:300]},
                                       on_unsent=unsent,
                                       later=f"{version.model_id} was not promoted; the active version serves on")
    except IntegrityError:  # the partial unique index: another version is promoting
        busy = EmbeddingModelVersion.objects.filter(status=Status.PROMOTING).first()
        raise EmbeddingVersionError(f"{busy.model_id if busy else 'another version'} is being promoted; "
                                    "wait until it is done") from None
    version.refresh_from_db()
    return version


def embedding_version_rollback_request(*, note: str = "rolled back", enqueue: bool = True) -> EmbeddingModelVersion:
    """``embedding_version_promotion_request`` for the version the latest promotion replaced (the
    one holding kept vectors): a rollback in a worker. Returns it (``promoting``). Raises
    ``EmbeddingVersionError`` when there is none, or as the request does."""
    previous = embedding_version_previous()
    if previous is None:
        raise EmbeddingVersionError("no earlier embedding version with kept vectors to roll back to")
    return embedding_version_promotion_request(previous.pk, note=note, enqueue=enqueue)


def embedding_version_promotion_restore(version_id: int, reason: str) -> bool:
    """Put a ``promoting`` version back to the status it had before the request (``promoting_from``,
    ``ready`` when unknown) with ``reason``: its switch failed or never ran; the active version kept
    serving. A compare-and-set; returns whether it was changed."""
    with transaction.atomic():
        version = EmbeddingModelVersion.objects.select_for_update().filter(pk=version_id).first()
        if version is None or version.status != Status.PROMOTING:
            return False
        back = version.promoting_from if version.promoting_from in EmbeddingModelVersion.ACTIVATABLE_STATUSES \
            else Status.READY
        EmbeddingModelVersion.objects.filter(pk=version_id).update(status=back, promoting_from="",
                                                                   reason=reason[:4000])
    return True


def embedding_version_promotion_run(version_id: int, *, note: str = "",
                                    before_switch: Callable[[], None] | None = None,
                                    on_progress: Callable[[], None] | None = None) -> EmbeddingModelVersion:
    """The worker's half of a promotion (or rollback) requested by ``embedding_version_promotion_request``:
    when ``version_id`` is ``promoting``, activate it (``embedding_version_activate(claimed=True)``),
    writing ``heartbeat_at`` during the catch-up before the switch (``on_progress()`` too). Returns
    the version: ``active``, or unchanged when it was not promoting (a second delivery of the task,
    or a request the stale sweep gave up: nothing is done).

    On any error the switch's transaction is rolled back (the active version kept serving), the
    version goes back to its earlier status with ``"promotion failed: <error>; <active> kept serving"``
    as its reason (``embedding_version_promotion_restore``), and the error is raised again
    (``EmbeddingVersionError`` for the expected ones: a changed folder, a status changed meanwhile).
    """
    version = EmbeddingModelVersion.objects.get(pk=version_id)
    if version.status != Status.PROMOTING:
        logger.info("embedding version %s is %s, not promoting; nothing to do", version.model_id, version.status)
        return version

    def heartbeat() -> None:
        EmbeddingModelVersion.objects.filter(pk=version.pk, status=Status.PROMOTING).update(heartbeat_at=timezone.now())
        if on_progress:
            on_progress()

    try:
        return embedding_version_activate(version.pk, note=note, claimed=True, before_switch=before_switch,
                                          on_progress=heartbeat)
    except Exception as error:
        serving = embedding_module.active_embedding().model_id
        logger.warning("promotion of embedding version %s failed: %s", version.model_id, error)
        embedding_version_promotion_restore(version.pk, f"promotion failed: {error}; {serving} kept serving")
        raise


def _promotion_under_way(cursor) -> bool:
    """Whether something holds the vectors lock (an activation in its transaction, or chunk writes):
    tried without waiting, released when the caller's transaction ends."""
    cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [VECTORS_LOCK_KEY])
    return not cursor.fetchone()[0]


def embedding_version_previous() -> EmbeddingModelVersion | None:
    """The version the latest activation retired (the one holding kept vectors), or ``None``."""
    return (EmbeddingModelVersion.objects.filter(status=Status.RETIRED, retired_at__isnull=False)
            .filter(Exists(ChunkEmbedding.objects.filter(version_id=OuterRef("pk"))))
            .order_by("-retired_at", "-id").first())


def embedding_version_rollback(*, note: str = "rolled back") -> EmbeddingModelVersion:
    """Activate the version the latest promotion replaced, from its kept vectors (one action; only
    chunks written since are embedded). Raises ``EmbeddingVersionError`` when there is none."""
    previous = embedding_version_previous()
    if previous is None:
        raise EmbeddingVersionError("no earlier embedding version with kept vectors to roll back to")
    return embedding_version_activate(previous.pk, note=note)


def embedding_version_thresholds_set(version_id: int, *, abstain_max_distance: float | None,
                                     follow_up_max_distance: float | None, calibration: dict | None = None,
                                     curated_match_max_distance: float | None = None,
                                     follow_up_own_margin: float | None = None) -> None:
    """Record ``version_id``'s own thresholds and how they were fitted (``calibration``, JSON):
    abstention (``abstain_max_distance`` / ``follow_up_max_distance``, cosine distance 0..2), the
    curated-answer match (``curated_match_max_distance``, 0..2, question to question) and the
    own-words margin (``follow_up_own_margin``, a difference of distances, -2..2, negative: off);
    ``None`` means the settings' ``ABSTAIN_MAX_DISTANCE`` / ``FOLLOW_UP_MAX_DISTANCE`` /
    ``CURATED_MATCH_MAX_DISTANCE`` / ``FOLLOW_UP_OWN_MARGIN``. The pipeline reads the active version's
    (``knowledge.embedding.active_embedding``), so a promoted version decides by its own distance
    scale. Raises ``ValueError`` for a value out of its range (the database refuses it too)."""
    for value in (abstain_max_distance, follow_up_max_distance, curated_match_max_distance):
        if value is not None and not 0 <= value <= 2:
            raise ValueError(f"a cosine distance threshold must be in [0, 2], got {value}")
    if follow_up_own_margin is not None and not -2 <= follow_up_own_margin <= 2:
        raise ValueError(f"a margin of cosine distances must be in [-2, 2], got {follow_up_own_margin}")
    EmbeddingModelVersion.objects.filter(pk=version_id).update(
        abstain_max_distance=abstain_max_distance, follow_up_max_distance=follow_up_max_distance,
        curated_match_max_distance=curated_match_max_distance, follow_up_own_margin=follow_up_own_margin,
        calibration=calibration or {})
