"""Model files in the artifact storage: publish a local file, and materialise a stored one into this
host's cache before llama.cpp opens it.

llama.cpp (and transformers' GGUF loader) open a file path, so a model file cannot be read through
Django's storage API directly. A model version (``chat.models.ModelVersion``) therefore refers to each
of its files either by a plain local path (the packaged base GGUF, a deployer's ``LLM_MODEL_PATH``:
every host that loads it needs the file at that path) or by a reference into the artifact storage,
``ARTIFACT_PREFIX`` + the storage name (``"artifacts:models/<sha256>/adapter.gguf"``), which every
host reads through ``STORAGES["artifacts"]`` (a folder by default, S3-compatible object storage with
django-storages; README "Running on several hosts").

Names are content-addressed (``models/<sha256 of the bytes>/<file name>``): a name is written once and
never changes meaning, publishing the same bytes twice stores them once, and the digest recorded on
the version says what the bytes must be. A host loading a stored file copies it into
``MODEL_CACHE_DIR/<sha256>/<file name>`` on first use (to a temporary file, hashed while it is
copied, renamed into place only when the digest matches) and reuses that copy afterwards, checking it
as any local file (``chat.model_files.file_sha256``, cached per path, size and mtime).

No database access here: ``chat.services.model_versions`` maps versions onto these functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages

from chat.model_files import file_sha256, file_sha256_remember, gguf_file_problem

logger = logging.getLogger(__name__)

# The ``STORAGES`` alias of published model files, and the prefix of a reference to one.
ARTIFACT_STORAGE_ALIAS = "artifacts"
ARTIFACT_PREFIX = "artifacts:"
_CHUNK_BYTES = 1 << 20

_download_locks: dict[str, threading.Lock] = {}
_download_locks_guard = threading.Lock()


class ArtifactMissing(FileNotFoundError):
    """The artifact storage holds no object under a version's reference."""


class ArtifactMismatch(Exception):
    """A stored object's SHA-256 is not the digest recorded for it (nothing is cached)."""


def artifact_storage():
    """The storage of published model files (``STORAGES["artifacts"]``, ``ARTIFACT_STORAGE_BACKEND`` /
    ``ARTIFACT_STORAGE_OPTIONS``)."""
    return storages[ARTIFACT_STORAGE_ALIAS]


def is_artifact(reference: str) -> bool:
    """Whether a version's file ``reference`` names an object of the artifact storage (else it is a
    local path, or ``""``)."""
    return bool(reference) and reference.startswith(ARTIFACT_PREFIX)


def artifact_name(reference: str) -> str:
    """The storage name of ``reference`` (``"artifacts:models/ab../adapter.gguf"`` →
    ``"models/ab../adapter.gguf"``). Raises ``ValueError`` for a local path."""
    if not is_artifact(reference):
        raise ValueError(f"not an artifact reference: {reference!r}")
    return reference[len(ARTIFACT_PREFIX):]


def artifact_publish(path: str | Path) -> tuple[str, str]:
    """Copy the local file at ``path`` into the artifact storage under ``models/<sha256>/<file name>``
    unless an object of that name exists. Returns ``(reference, sha256)``.

    The name the storage actually used is returned (a storage that refuses to overwrite may pick
    another when two hosts publish the same bytes at once; both names then hold those bytes).
    Raises ``FileNotFoundError``; whatever the storage raises (nothing is recorded anywhere then).
    """
    path = Path(path)
    sha256 = file_sha256(path)
    name = str(PurePosixPath("models") / sha256 / path.name)
    storage = artifact_storage()
    if not storage.exists(name):
        with open(path, "rb") as handle:
            name = storage.save(name, File(handle, name=path.name))
        logger.info("published %s as %s%s", path, ARTIFACT_PREFIX, name)
    return ARTIFACT_PREFIX + name, sha256


def artifact_cache_path(reference: str, sha256: str) -> Path:
    """Where this host keeps its copy of ``reference`` with digest ``sha256``:
    ``MODEL_CACHE_DIR/<sha256>/<file name>`` (keyed by the recorded digest, so two versions sharing
    bytes share the copy, and a copy is never mistaken for other bytes)."""
    return Path(settings.MODEL_CACHE_DIR) / sha256 / PurePosixPath(artifact_name(reference)).name


def _lock_for(key: str) -> threading.Lock:
    with _download_locks_guard:
        return _download_locks.setdefault(key, threading.Lock())


def artifact_materialise(reference: str, sha256: str) -> Path:
    """The local path of ``reference``'s bytes, checked against ``sha256``: the cached copy when it has
    that digest, else a fresh copy from the artifact storage (streamed to a temporary file in the
    cache folder, hashed on the way, renamed into place only when the digest matches; a cached copy
    with another digest is replaced). One download per reference at a time in a process; processes
    on one host may download the same file at once, and the last rename wins with the same bytes.

    Raises ``ArtifactMissing`` when the storage has no such object, ``ArtifactMismatch`` (with both
    digests; nothing is cached) when its bytes are not ``sha256``'s, ``ValueError`` without a
    recorded digest; whatever the storage raises.
    """
    if not sha256:
        raise ValueError(f"{reference}: a stored model file needs its recorded SHA-256")
    local = artifact_cache_path(reference, sha256)
    with _lock_for(str(local)):
        try:
            if file_sha256(local) == sha256:
                return local
            logger.warning("cached copy %s does not match %s; copying it again", local, sha256)
        except FileNotFoundError:
            pass
        name = artifact_name(reference)
        storage = artifact_storage()
        local.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=local.parent, prefix=".download-", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as output:
                try:
                    stored = storage.open(name, "rb")
                except FileNotFoundError:
                    raise ArtifactMissing(f"model file not found in the artifact storage: {reference}") from None
                with stored:
                    for chunk in stored.chunks(_CHUNK_BYTES):
                        digest.update(chunk)
                        output.write(chunk)
            actual = digest.hexdigest()
            if actual != sha256:
                raise ArtifactMismatch(f"{reference} has sha256 {actual} in the artifact storage, "
                                       f"but {sha256} was recorded for it")
            os.replace(temporary, local)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        file_sha256_remember(local, sha256)
        logger.info("copied %s into %s", reference, local)
        return local


def model_file_local(reference: str, sha256: str) -> str:
    """A version's file as a local path llama.cpp can open: ``reference`` itself when it is a local
    path (or ``""``), the materialised copy (``artifact_materialise``) when it is stored. Raises as
    ``artifact_materialise``."""
    if not is_artifact(reference):
        return reference
    return str(artifact_materialise(reference, sha256))


def model_file_problem(reference: str, sha256: str = "") -> str | None:
    """Why ``reference`` (recorded digest ``sha256``) cannot be served, without copying anything: for
    a local path, ``chat.model_files.gguf_file_problem``; for a stored file, the header problem of
    this host's cached copy when it has one, else ``"model file not found in the artifact storage:
    <reference>"`` when the storage has no such object. ``None`` when it looks servable (a stored file
    not yet copied is copied, and its digest checked, when it is loaded)."""
    if not is_artifact(reference):
        return gguf_file_problem(reference)
    if sha256:
        cached = artifact_cache_path(reference, sha256)
        if cached.is_file():
            return gguf_file_problem(cached)
    try:
        if artifact_storage().exists(artifact_name(reference)):
            return None
    except Exception as error:  # an unreachable object store is a reason, not a 500
        return f"artifact storage not reachable for {reference}: {error}"
    return f"model file not found in the artifact storage: {reference}"
