"""Knowledge-base writes, one module per concern:

- ``knowledge.services.sources``: registering files and folders as sources, uploads and their
  pending files, deleting a source, queueing ingestion tasks (``sources_enqueue``);
- ``knowledge.services.products``: a product rendered as Markdown and ingested as a source;
- ``knowledge.services.ingestion``: ``document_ingest`` and ``documents_ingest`` (read, parse,
  chunk, embed and swap in a source's pending version, superseded by a newer upload or failed with
  the reason; its module docstring describes the steps);
- ``knowledge.services.chunks``: the chunk swap that keeps the ids of unchanged passages, and the
  full-text vectors (``update_search_vectors``);
- ``knowledge.services.curated``: curated answers (approved corrections stored as sources of kind
  ``curated``), and their retirement when the evidence they cite changes;
- ``knowledge.services.lexemes``: the lexeme document frequencies per collection that the full-text
  leg of retrieval reads (``lexeme_frequencies_refresh``, after ingestion and deletion);
- ``knowledge.services.reembedding``: new vectors after the embedding model changed (``reembed``),
  including the schema change when ``EMBEDDING_DIM`` changed;
- ``knowledge.services.embedding_versions``: embedding-model versions (blue/green vectors): register
  a candidate, build its shadow vectors while the active version serves, activate it for every
  process at once (requested from a request, run in a worker), roll back from the kept vectors, and
  record a version's fitted abstention thresholds.

Import from the package, not the modules: ``from knowledge import services`` and
``services.document_ingest(...)``, or ``from knowledge.services import document_ingest``. Every public
name is re-exported here. Interfaces (tasks, admin, management commands) call the package's names at
call time, so a test replaces ``services.document_ingest`` with
``monkeypatch.setattr("knowledge.services.document_ingest", fake)``; a name used inside a module
(say ``_swap_chunks`` or ``sources_enqueue`` inside ``source_upload``) is replaced in that module
(``knowledge.services.chunks``' users import it by name: patch ``knowledge.services.ingestion._swap_chunks``).
"""

from __future__ import annotations

from knowledge.services.chunks import update_search_vectors
from knowledge.services.curated import (
    CuratedAnswerError,
    curated_answer_delete,
    curated_answer_put,
    curated_answer_update,
)
from knowledge.services.ingestion import (
    IngestResult,
    SourceUnavailable,
    document_ingest,
    documents_ingest,
    internal_error_reason,
    mark_failed,
    sources_fail_unfinished,
    too_large_reason,
)
from knowledge.services.embedding_versions import (
    EmbeddingVersionError,
    embedding_version_activate,
    embedding_version_bootstrap,
    embedding_version_build,
    embedding_version_fail,
    embedding_version_previous,
    embedding_version_promotion_request,
    embedding_version_promotion_restore,
    embedding_version_promotion_run,
    embedding_version_register,
    embedding_version_reject,
    embedding_version_rollback,
    embedding_version_rollback_request,
    embedding_version_thresholds_set,
    embedding_versions_fail_stale,
)
from knowledge.services.lexemes import lexeme_frequencies_refresh
from knowledge.services.products import product_delete, product_markdown, product_sync
from knowledge.services.reembedding import ReembedResult, embedding_text, reembed
from knowledge.services.sources import (
    RegisterResult,
    UploadRefused,
    iter_files,
    pending_file_store,
    source_delete,
    sources_delete,
    source_upload,
    sources_enqueue,
    sources_send_unsent,
    sources_upload,
    sources_register_paths,
)

__all__ = [
    # sources
    "RegisterResult",
    "UploadRefused",
    "iter_files",
    "pending_file_store",
    "source_delete",
    "sources_delete",
    "source_upload",
    "sources_enqueue",
    "sources_send_unsent",
    "sources_upload",
    "sources_register_paths",
    # products
    "product_delete",
    "product_markdown",
    "product_sync",
    # ingestion
    "IngestResult",
    "SourceUnavailable",
    "document_ingest",
    "documents_ingest",
    "internal_error_reason",
    "mark_failed",
    "sources_fail_unfinished",
    "too_large_reason",
    # chunks and their full-text vectors
    "update_search_vectors",
    "lexeme_frequencies_refresh",
    # curated answers
    "CuratedAnswerError",
    "curated_answer_delete",
    "curated_answer_put",
    "curated_answer_update",
    # embedding-model versions
    "EmbeddingVersionError",
    "embedding_version_activate",
    "embedding_version_bootstrap",
    "embedding_version_build",
    "embedding_version_fail",
    "embedding_version_previous",
    "embedding_version_promotion_request",
    "embedding_version_promotion_restore",
    "embedding_version_promotion_run",
    "embedding_version_register",
    "embedding_version_reject",
    "embedding_version_rollback",
    "embedding_version_rollback_request",
    "embedding_version_thresholds_set",
    "embedding_versions_fail_stale",
    # re-embedding
    "ReembedResult",
    "embedding_text",
    "reembed",
]
