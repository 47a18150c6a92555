"""Model files published to the artifact storage (``chat.model_artifacts``) and loaded on other hosts.

Two "hosts" in one process: each has its own ``TUNING_DIR`` and ``MODEL_CACHE_DIR`` (settings switched
between the steps); they share the database and the artifact storage's root (``STORAGES["artifacts"]``,
a folder here, as a shared volume or a bucket would be). The engine is the real ``Engine`` over fake
models (``fake_engine``), which records the key, so the local paths it was given, of every load.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from chat import engine as engine_module
from chat import model_artifacts, services
from chat.model_server import ModelFileChanged, registry_key
from chat.models import ModelVersion

pytestmark = pytest.mark.django_db

ADAPTER_BYTES = b"GGUF\x03\x00\x00\x00 a LoRA adapter exported by host A"
BASE_BYTES = b"GGUF\x03\x00\x00\x00 the base model every host has at the same path"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def hosts(settings, tmp_path):
    """``switch(name)`` makes this process host ``name`` (its own ``TUNING_DIR`` and ``MODEL_CACHE_DIR``
    under ``tmp_path/<name>``); the artifact storage's root ``tmp_path/shared`` is the same for all.
    Returns ``(switch, shared_root, base_path)``; the base GGUF is a plain local path, as the packaged
    model is."""
    shared = tmp_path / "shared"
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(shared)}}}
    base = tmp_path / "base.gguf"
    base.write_bytes(BASE_BYTES)

    def switch(name: str) -> Path:
        settings.TUNING_DIR = str(tmp_path / name / "tuning")
        settings.MODEL_CACHE_DIR = str(tmp_path / name / "cache")
        return tmp_path / name

    return switch, shared, base


def publish_on(host: Path, base: Path, *, name: str = "run-1") -> ModelVersion:
    """As the tuner on ``host``: export an adapter into its ``TUNING_DIR`` and register it published."""
    scratch = host / "tuning" / "runs" / "1"
    scratch.mkdir(parents=True)
    (scratch / "adapter.gguf").write_bytes(ADAPTER_BYTES)
    return services.model_version_register(name=name, base_model_path=str(base),
                                           adapter_path=str(scratch / "adapter.gguf"), publish_adapter=True)


def test_a_version_published_by_one_host_is_loaded_by_another_from_its_own_cache(hosts, fake_engine):
    switch, shared, base = hosts
    # given host A (the tuner) publishes its adapter
    host_a = switch("a")
    version = publish_on(host_a, base)
    # then the version refers to the stored object by content and records its digest
    digest = sha(ADAPTER_BYTES)
    assert (version.adapter_path, version.adapter_sha256) == (f"artifacts:models/{digest}/adapter.gguf", digest)
    assert (version.base_model_path, version.base_model_sha256) == (str(base), sha(BASE_BYTES))
    assert files_under(shared) == [f"models/{digest}/adapter.gguf"]
    # and host A's scratch folder is gone (another host never sees it anyway)
    shutil.rmtree(host_a / "tuning")

    # when host B activates it and serves it
    host_b = switch("b")
    services.model_version_activate(version)
    engine = services.engine_for(version)
    # then host B's engine loaded the copy in host B's cache, with the published bytes
    cached = host_b / "cache" / digest / "adapter.gguf"
    assert engine.current_key == engine_module.ModelKey(str(base), str(cached))
    assert [m.key.adapter_path for m in fake_engine.models] == [str(cached)]
    assert cached.read_bytes() == ADAPTER_BYTES
    assert files_under(host_b / "cache") == [f"{digest}/adapter.gguf"]  # no partial download left

    # and the next time the cached copy is used: the stored object is no longer read
    (shared / "models" / digest / "adapter.gguf").unlink()
    assert services.model_key(version).adapter_path == str(cached)

    # and a third host, with another cache, copies it again (from a storage that has it)
    (shared / "models" / digest).mkdir(parents=True, exist_ok=True)
    (shared / "models" / digest / "adapter.gguf").write_bytes(ADAPTER_BYTES)
    host_c = switch("c")
    assert services.model_key(version).adapter_path == str(host_c / "cache" / digest / "adapter.gguf")


@pytest.mark.django_db(transaction=True)  # the model server's lookup closes its connection afterwards
def test_a_corrupted_stored_adapter_is_refused_with_the_reason_and_the_active_version_keeps_serving(hosts, fake_engine):
    switch, shared, base = hosts
    # given host A published a candidate, and host B serves the base version
    version = publish_on(switch("a"), base)
    host_b = switch("b")
    active = services.model_version_register(name="base", base_model_path=str(base))
    services.model_version_activate(active)
    services.engine_for(active)
    # and the stored object's bytes change afterwards (a bad copy, a bucket written by hand)
    digest = sha(ADAPTER_BYTES)
    stored = shared / "models" / digest / "adapter.gguf"
    stored.write_bytes(b"GGUF\x03\x00\x00\x00 something else")

    # when host B is asked to activate it
    with pytest.raises(engine_module.ModelFilesMismatch) as refused:
        services.model_version_activate(version)
    # then it is refused with the reason, the base stays active, and nothing is cached
    reason = (f"artifacts:models/{digest}/adapter.gguf has sha256 {sha(stored.read_bytes())} in the artifact storage, "
              f"but {digest} was recorded for it")
    assert str(refused.value) == reason
    version.refresh_from_db()
    assert (version.is_active, version.refused_reason) == (False, reason)
    assert services.model_version_active() == active
    assert files_under(host_b / "cache") == []

    # when another host had activated it before the corruption, the answer path keeps the base serving
    ModelVersion.objects.filter(pk=active.pk).update(is_active=False)
    ModelVersion.objects.filter(pk=version.pk).update(is_active=True, refused_reason="")
    engine, serving = services.engine_serving(ModelVersion.objects.get(pk=version.pk))
    assert serving == active and engine.current_key == engine_module.ModelKey(str(base))
    assert len(fake_engine.models) == 1
    assert ModelVersion.objects.get(pk=version.pk).refused_reason == reason

    # and the model server answers 409 for it, with the same reason
    with pytest.raises(ModelFileChanged, match=f"run-1: {reason}"):
        registry_key("run-1")


def test_a_cached_copy_with_other_bytes_is_copied_again_and_a_missing_object_is_a_reason(hosts, fake_engine):
    switch, shared, base = hosts
    version = publish_on(switch("a"), base)
    host_b = switch("b")
    digest = sha(ADAPTER_BYTES)
    cached = host_b / "cache" / digest / "adapter.gguf"
    assert Path(services.model_key(version).adapter_path) == cached
    # given host B's copy was damaged (a disk error, an edit by hand)
    cached.write_bytes(b"GGUF damaged")
    # when it is needed again, it is copied again from the storage
    assert Path(services.model_key(version).adapter_path) == cached and cached.read_bytes() == ADAPTER_BYTES

    # given the stored object is gone and host C has no copy
    (shared / "models" / digest / "adapter.gguf").unlink()
    switch("c")
    # then loading fails with the reason, and readiness / the model server's listing say it too
    reason = f"model file not found in the artifact storage: artifacts:models/{digest}/adapter.gguf"
    with pytest.raises(engine_module.EngineError, match=reason):
        services.model_version_activate(version)
    assert model_artifacts.model_file_problem(version.adapter_path, version.adapter_sha256) == reason
    # (while a host with a copy still has it)
    switch("b")
    assert model_artifacts.model_file_problem(version.adapter_path, version.adapter_sha256) is None


def test_publishing_the_same_bytes_twice_stores_them_once(hosts):
    switch, shared, base = hosts
    first = publish_on(switch("a"), base, name="run-1")
    second = publish_on(switch("b"), base, name="run-2")
    assert first.adapter_path == second.adapter_path
    assert files_under(shared) == [f"models/{sha(ADAPTER_BYTES)}/adapter.gguf"]


def test_a_version_of_local_paths_is_served_from_those_paths(hosts, fake_engine, tmp_path):
    switch, shared, base = hosts
    switch("b")
    adapter = tmp_path / "deployer" / "adapter.gguf"
    adapter.parent.mkdir()
    adapter.write_bytes(ADAPTER_BYTES)
    version = services.model_version_register(name="local", base_model_path=str(base), adapter_path=str(adapter))
    assert (version.adapter_path, version.adapter_sha256) == (str(adapter), sha(ADAPTER_BYTES))
    services.model_version_activate(version)
    assert services.engine_for(version).current_key == engine_module.ModelKey(str(base), str(adapter))
    assert files_under(shared) == [] and not (tmp_path / "b" / "cache").exists()
