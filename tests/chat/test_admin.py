"""The admin of the model-version registry (``chat.admin.ModelVersionAdmin``): its "activate" action
serves a version, and a version whose files are refused gives the admin an error message naming it
and the reason, never a 500, while the active version keeps serving."""

from __future__ import annotations

import hashlib
import html

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from chat.models import ModelVersion

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:chat_modelversion_changelist"
BASE_BYTES, ADAPTER_BYTES = b"GGUF base", b"GGUF adapter"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def versions(tmp_path, settings):
    """``(base, tuned)``: the base active; the tuned one with a local adapter file. The artifact
    storage is an empty folder of this test's own."""
    settings.STORAGES = {**settings.STORAGES, "artifacts": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "shared")}}}
    settings.MODEL_CACHE_DIR = str(tmp_path / "cache")
    base_file, adapter_file = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    base_file.write_bytes(BASE_BYTES)
    adapter_file.write_bytes(ADAPTER_BYTES)
    base = ModelVersion.objects.create(name="base", base_model_path=str(base_file), base_model_sha256=sha(BASE_BYTES),
                                       is_active=True)
    tuned = ModelVersion.objects.create(name="run-1", base_model_path=str(base_file),
                                        base_model_sha256=sha(BASE_BYTES), adapter_path=str(adapter_file),
                                        adapter_sha256=sha(ADAPTER_BYTES))
    return base, tuned


def activate(admin_client, version: ModelVersion):
    """Run the changelist's "activate" action on ``version`` as the admin does (a POST of the form)."""
    return admin_client.post(reverse(CHANGELIST), {"action": "activate", "_selected_action": [version.pk]})


def shown(response) -> list[tuple[str, str]]:
    """``(level tag, text)`` of the messages the admin will show after ``response``."""
    return [(message.level_tag, message.message) for message in get_messages(response.wsgi_request)]


def test_activating_a_version_serves_it(admin_client, versions):
    base, tuned = versions
    response = activate(admin_client, tuned)
    assert response.status_code == 302
    assert shown(response) == [("success", "run-1 is now served; chats in progress finish on the old model.")]
    assert ModelVersion.objects.get(is_active=True) == tuned


def test_a_version_whose_adapter_changed_is_refused_with_the_reason_and_the_active_one_stays(admin_client, versions):
    # given the adapter file was overwritten after the version was registered
    base, tuned = versions
    with open(tuned.adapter_path, "wb") as file:
        file.write(b"GGUF adapter, tampered")
    # when the admin activates it
    response = activate(admin_client, tuned)
    # then the page says which version and why, the reason is recorded, and the base keeps serving
    reason = f"{tuned.adapter_path} has sha256 {sha(b'GGUF adapter, tampered')}, but {sha(ADAPTER_BYTES)} was recorded for it"
    assert response.status_code == 302
    assert shown(response) == [("error", f"run-1 was not activated: {reason}. base is still served.")]
    tuned.refresh_from_db()
    assert (tuned.is_active, tuned.refused_reason) == (False, reason)
    assert list(ModelVersion.objects.filter(is_active=True)) == [base]


def test_a_version_whose_stored_adapter_is_missing_is_refused_with_the_reason(admin_client, versions):
    # given a version whose adapter is named in the artifact storage, where it is not
    base, tuned = versions
    reference = f"artifacts:models/{sha(ADAPTER_BYTES)}/adapter.gguf"
    ModelVersion.objects.filter(pk=tuned.pk).update(adapter_path=reference)
    # when the admin activates it
    response = activate(admin_client, tuned)
    # then the page names it and the reason, and nothing else changed
    assert response.status_code == 302
    assert shown(response) == [("error", f"run-1 was not activated: model file not found in the artifact storage: "
                                         f"{reference}. base is still served.")]
    assert list(ModelVersion.objects.filter(is_active=True)) == [base]
    assert ModelVersion.objects.get(pk=tuned.pk).refused_reason == ""


def test_a_version_whose_base_file_is_gone_is_refused_and_the_page_renders(admin_client, versions, tmp_path):
    # given a version whose base GGUF is not at its path on this host
    base, tuned = versions
    ModelVersion.objects.filter(pk=tuned.pk).update(base_model_path=str(tmp_path / "gone.gguf"))
    # when the admin activates it and follows the redirect
    response = admin_client.post(reverse(CHANGELIST), {"action": "activate", "_selected_action": [tuned.pk]},
                                 follow=True)
    # then the changelist renders with the error (the admin capitalises messages), and the base keeps serving
    assert response.status_code == 200
    assert (f"Run-1 was not activated: model file not found: {tmp_path / 'gone.gguf'}. base is still served."
            in html.unescape(response.content.decode()))
    assert list(ModelVersion.objects.filter(is_active=True)) == [base]
