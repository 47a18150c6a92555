"""Empty conversations (no message at all) expire (``chat.retention``, task
``chat.expire_empty_conversations``) and the agents' inbox never lists them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from chat.agent_selectors import inbox_list
from chat.models import Conversation, ConversationRating, Message
from chat.services import conversation_start
from chat.tasks import expire_empty_conversations

pytestmark = pytest.mark.django_db


def aged(conversation: Conversation, seconds: float) -> Conversation:
    Conversation.objects.filter(pk=conversation.pk).update(created_at=timezone.now() - timedelta(seconds=seconds))
    return conversation


def test_empty_conversations_older_than_the_ttl_are_deleted(settings):
    # given an old empty conversation, an old one with a question, one with only the handoff note, and
    # a recent empty one
    settings.CONVERSATION_EMPTY_TTL_S = 3600
    old_empty = aged(conversation_start(), 7200)
    ConversationRating.objects.create(conversation=old_empty, rating=1)  # rated but never used
    asked = aged(conversation_start(), 7200)
    Message.objects.create(conversation=asked, role="user", text="Where is my parcel?")
    handed_off = aged(conversation_start(), 7200)
    Message.objects.create(conversation=handed_off, role="system", kind="handoff", text="The customer asked to talk to a person.")
    recent = aged(conversation_start(), 60)

    # when the periodic task runs
    assert expire_empty_conversations() == 1

    # then only the old empty one is gone (with its rating), and the messages are all there
    assert set(Conversation.objects.values_list("pk", flat=True)) == {asked.pk, handed_off.pk, recent.pk}
    assert ConversationRating.objects.count() == 0
    assert Message.objects.count() == 2
    assert expire_empty_conversations() == 0


def test_the_expiry_is_on_celery_beat():
    entry = django_settings.CELERY_BEAT_SCHEDULE["chat.expire_empty_conversations"]
    assert entry == {"task": "chat.expire_empty_conversations", "schedule": django_settings.STUCK_WORK_SWEEP_S}


def test_the_inbox_does_not_list_conversations_without_a_message():
    # given 150 empty conversations (a script hammering the API) and one with a question
    empties = Conversation.objects.bulk_create([Conversation() for _ in range(150)])
    asked = conversation_start()
    Message.objects.create(conversation=asked, role="user", text="Do you ship to Norway?")
    handed_off = conversation_start()
    Message.objects.create(conversation=handed_off, role="system", kind="handoff", text="The customer asked to talk to a person.")

    # then the inbox (first 100 rows) lists only the two that have messages
    assert [c.pk for c in inbox_list()] == [handed_off.pk, asked.pk]
    assert len(empties) == 150
