"""The storage of uploaded files (``STORAGES["default"]``) is set from the environment:
``STORAGE_BACKEND`` (a dotted class path) and ``STORAGE_OPTIONS`` (a JSON object of its keyword
arguments), so several hosts can share one storage (README "Running on several hosts"), e.g.
django-storages' S3 backend.

Settings are read when the process starts, so each case loads them in a subprocess with the test
settings (development mode: the run's embedded servers) and the variables under test; the probe
stores and reads a file through the storage of ``knowledge.models.Source.pending_file``, the field
every upload goes through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import django; django.setup()\n"
    "from django.core.files.base import ContentFile\n"
    "from knowledge.models import Source\n"
    "storage = Source._meta.get_field('pending_file').storage\n"
    "name = storage.save('sources/probe.txt', ContentFile(b'shared bytes'))\n"
    "with storage.open(name, 'rb') as handle:\n"
    "    print(storage.__class__.__name__, name, handle.read().decode())\n"
)


def probe(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """Run ``PROBE`` with the test settings, ``MEDIA_ROOT`` at ``tmp_path/media`` and ``variables``."""
    base = {key: value for key, value in os.environ.items() if key not in ("STORAGE_BACKEND", "STORAGE_OPTIONS")}
    environment = {**base, "DJANGO_SETTINGS_MODULE": "tests.settings", "MEDIA_ROOT": str(tmp_path / "media"),
                   **variables}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120)


def files_under(folder: Path) -> list[Path]:
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())


def test_by_default_uploads_are_files_under_media_root(tmp_path):
    # given neither variable set (this process's settings say the same)
    assert settings.STORAGES["default"] == {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {}}
    # when a file is stored through the uploads' storage
    result = probe(tmp_path)
    # then it is a file under MEDIA_ROOT
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FileSystemStorage", "sources/probe.txt", "shared", "bytes"]
    assert files_under(tmp_path / "media") == [Path("sources/probe.txt")]


def test_storage_options_take_effect(tmp_path):
    # given the file-system backend pointed at another folder (a shared volume's mount, say)
    shared = tmp_path / "shared-volume"
    # when a file is stored
    result = probe(tmp_path, STORAGE_OPTIONS=json.dumps({"location": str(shared)}))
    # then it is in that folder, and nothing is in MEDIA_ROOT
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FileSystemStorage", "sources/probe.txt", "shared", "bytes"]
    assert (shared / "sources" / "probe.txt").read_bytes() == b"shared bytes"
    assert not (tmp_path / "media").exists()


def test_storage_backend_takes_effect(tmp_path):
    # given another backend class (Django's in-memory storage stands in for django-storages' S3Storage)
    # when a file is stored
    result = probe(tmp_path, STORAGE_BACKEND="django.core.files.storage.InMemoryStorage")
    # then that backend stored it, and no file was written to MEDIA_ROOT
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["InMemoryStorage", "sources/probe.txt", "shared", "bytes"]
    assert not (tmp_path / "media").exists()


def test_storage_options_that_are_not_a_json_object_stop_start_up(tmp_path):
    messages = []
    for value in ('{"bucket_name": ', '["support-uploads"]'):
        result = probe(tmp_path, STORAGE_OPTIONS=value)
        assert result.returncode == 1
        messages.append(result.stderr.strip().splitlines()[-1])
    assert messages == [
        'django.core.exceptions.ImproperlyConfigured: STORAGE_OPTIONS is not valid JSON; it must be a JSON object '
        'such as {"bucket_name": "support-uploads"}',
        "django.core.exceptions.ImproperlyConfigured: STORAGE_OPTIONS must be a JSON object, not ['support-uploads']",
    ]
    assert not (tmp_path / "media").exists()


# The artifact storage (``STORAGES["artifacts"]``: published model files, ``chat.model_artifacts``) is
# set the same way by its own variables, and publishing goes through it.
ARTIFACT_PROBE = (
    "import django, sys; django.setup()\n"
    "from chat.model_artifacts import artifact_publish, artifact_storage\n"
    "reference, digest = artifact_publish(sys.argv[1])\n"
    "print(artifact_storage().__class__.__name__, reference, artifact_storage().exists(reference.split(':', 1)[1]))\n"
)


def artifact_probe(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """Publish ``tmp_path/adapter.gguf`` in a subprocess with the test settings, ``DATA_DIR``'s
    defaults moved under ``tmp_path`` and ``variables``."""
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF adapter bytes")
    base = {key: value for key, value in os.environ.items() if not key.startswith("ARTIFACT_STORAGE")}
    environment = {**base, "DJANGO_SETTINGS_MODULE": "tests.settings", "MEDIA_ROOT": str(tmp_path / "media"),
                   "ARTIFACT_STORAGE_DIR": str(tmp_path / "artifacts"), **variables}
    return subprocess.run([sys.executable, "-c", ARTIFACT_PROBE, str(adapter)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_by_default_artifacts_are_files_under_artifact_storage_dir_apart_from_uploads(tmp_path):
    import hashlib

    digest = hashlib.sha256(b"GGUF adapter bytes").hexdigest()
    result = artifact_probe(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["FileSystemStorage", f"artifacts:models/{digest}/adapter.gguf", "True"]
    assert files_under(tmp_path / "artifacts") == [Path(f"models/{digest}/adapter.gguf")]
    assert not (tmp_path / "media").exists()


def test_artifact_storage_variables_take_effect(tmp_path):
    # given the in-memory storage standing in for an object store, then a folder named in the options
    result = artifact_probe(tmp_path, ARTIFACT_STORAGE_BACKEND="django.core.files.storage.InMemoryStorage")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0::2] == ["InMemoryStorage", "True"]
    assert not (tmp_path / "artifacts").exists()
    shared = tmp_path / "bucket-mount"
    result = artifact_probe(tmp_path, ARTIFACT_STORAGE_OPTIONS=json.dumps({"location": str(shared)}))
    assert result.returncode == 0, result.stderr
    assert len(files_under(shared)) == 1 and not (tmp_path / "artifacts").exists()
    # and malformed options stop start-up, naming the variable
    result = artifact_probe(tmp_path, ARTIFACT_STORAGE_OPTIONS="[]")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "django.core.exceptions.ImproperlyConfigured: ARTIFACT_STORAGE_OPTIONS must be a JSON object, not []")
