"""Chat models and the services that write them: conversations, handoff, the model-version registry."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from django.conf import settings
from django.db import IntegrityError, transaction

from chat import services
from chat.models import Conversation, Message, ModelVersion
from chat.selectors import conversation_get, conversation_history

pytestmark = pytest.mark.django_db


def test_conversation_start_creates_a_bot_conversation_with_a_secret_token():
    conversation = services.conversation_start(collection="doc2dial", origin="https://shop.example")
    assert isinstance(conversation.id, uuid.UUID)
    assert conversation.status == Conversation.Status.BOT
    assert conversation.collection == "doc2dial"
    assert conversation.origin == "https://shop.example"
    assert len(conversation.token) == 43
    other = services.conversation_start()
    assert other.token != conversation.token
    assert other.collection == "default"


def test_conversation_get_checks_the_token():
    conversation = services.conversation_start()
    assert conversation_get(str(conversation.id), token=conversation.token) == conversation
    with pytest.raises(Conversation.DoesNotExist):
        conversation_get(conversation.id, token="wrong")
    with pytest.raises(Conversation.DoesNotExist):
        conversation_get("not-a-uuid")
    with pytest.raises(Conversation.DoesNotExist):
        conversation_get(uuid.uuid4())


def test_request_human_sets_needs_human_and_adds_one_system_message():
    # given a bot conversation
    conversation = services.conversation_start()
    # when the customer asks for a human twice
    first = services.conversation_request_human(conversation)
    second = services.conversation_request_human(conversation)
    # then the status is needs_human and there is exactly one system message
    assert first.status == second.status == Conversation.Status.NEEDS_HUMAN
    assert list(conversation.messages.values_list("role", "text")) == [("system", services.HANDOFF_MESSAGE)]


def test_messages_are_ordered_by_creation_and_history_skips_system_and_abstentions():
    conversation = services.conversation_start()
    Message.objects.create(conversation=conversation, role="user", text="How do I renew?")
    Message.objects.create(conversation=conversation, role="assistant", text=services.ABSTAIN_MESSAGE, abstained=True)
    Message.objects.create(conversation=conversation, role="system", kind="handoff", text="handoff")
    Message.objects.create(conversation=conversation, role="agent", text="Online at dmv.ny.gov.")
    assert [m.text for m in conversation.messages.all()] == [
        "How do I renew?", services.ABSTAIN_MESSAGE, "handoff", "Online at dmv.ny.gov."
    ]
    assert conversation_history(conversation) == [
        {"role": "user", "text": "How do I renew?"},
        {"role": "agent", "text": "Online at dmv.ny.gov."},
    ]


def test_at_most_one_model_version_is_active():
    ModelVersion.objects.create(name="a", base_model_path="/m/a.gguf", base_model_sha256="0" * 64, is_active=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersion.objects.create(name="b", base_model_path="/m/b.gguf", base_model_sha256="1" * 64, is_active=True)
    assert list(ModelVersion.objects.values_list("name", "is_active")) == [("a", True)]


def test_model_version_active_creates_the_default_from_settings():
    # given no model version
    assert not ModelVersion.objects.exists()
    # when the active one is asked for (twice)
    version = services.model_version_active()
    again = services.model_version_active()
    # then one default version of LLM_MODEL_PATH exists, active, without adapter, with the file's hash
    with open(settings.LLM_MODEL_PATH, "rb") as handle:
        sha = hashlib.file_digest(handle, "sha256").hexdigest()
    assert version == again
    assert version.is_active is True
    assert version.base_model_path == settings.LLM_MODEL_PATH
    assert version.base_model_sha256 == sha
    assert version.adapter_path == ""
    assert version.name.endswith(sha[:12])
    assert ModelVersion.objects.count() == 1


def test_model_version_register_and_activate_switches_the_active_version(tmp_path):
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF fake adapter")
    default = services.model_version_active()
    candidate = services.model_version_register(
        name="lora-2024-06", base_model_path=settings.LLM_MODEL_PATH, adapter_path=str(adapter), notes="candidate"
    )
    assert candidate.is_active is False
    assert candidate.adapter_sha256 == hashlib.sha256(b"GGUF fake adapter").hexdigest()
    services.model_version_activate(candidate)
    assert services.model_version_active() == candidate
    default.refresh_from_db()
    assert default.is_active is False
    services.model_version_activate(default)  # roll back
    assert services.model_version_active() == default
    assert ModelVersion.objects.filter(is_active=True).count() == 1


def test_model_version_register_refuses_a_missing_file():
    with pytest.raises(FileNotFoundError):
        services.model_version_register(name="x", base_model_path="/nonexistent.gguf")
    assert not ModelVersion.objects.exists()
