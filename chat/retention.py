"""How long conversations are kept: empty conversations (no message at all) expire.

A conversation is created before its first question is sent, so a visitor who opens the widget and
leaves, a failed first send, or a script starting conversations in a loop (1,190 in 10 s were seen)
leaves rows without a message. The agents' inbox does not list them
(``chat.agent_selectors.inbox_list``); ``conversations_expire_empty`` deletes them once older than
``CONVERSATION_EMPTY_TTL_S`` (Celery beat: ``chat.expire_empty_conversations``). A widget still
holding such a conversation's token finds it gone (403) and starts a new one.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from chat.models import Conversation, Message

# Conversations deleted per transaction (each batch's rows are locked while it runs).
EXPIRE_BATCH = 1000


def conversations_expire_empty(*, ttl_s: float | None = None, now=None) -> int:
    """Delete every conversation without any message created more than ``ttl_s`` seconds ago (default
    ``settings.CONVERSATION_EMPTY_TTL_S``). Returns how many were deleted.

    Safe against a first message arriving at the same moment: each batch locks its rows
    (``SELECT ... FOR UPDATE SKIP LOCKED``, which a message insert's foreign-key check waits for) and
    re-checks emptiness under the lock, so a conversation is never deleted with messages; a message
    sent to a conversation deleted in the same instant fails (the widget then starts a new one).
    Safe to run concurrently (locked rows are skipped)."""
    ttl_s = settings.CONVERSATION_EMPTY_TTL_S if ttl_s is None else ttl_s
    cutoff = (now or timezone.now()) - timedelta(seconds=ttl_s)
    no_message = ~Exists(Message.objects.filter(conversation=OuterRef("pk")))
    empty = Conversation.objects.filter(created_at__lt=cutoff).filter(no_message)
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(empty.order_by().select_for_update(skip_locked=True).values_list("pk", flat=True)[:EXPIRE_BATCH])
            if not ids:
                return deleted
            # Re-checked in a new statement once locked: a message committed between the first
            # statement's snapshot and the lock is seen here, and none can be added from now on.
            still_empty = Conversation.objects.filter(pk__in=ids).filter(no_message)
            deleted += still_empty.delete()[1].get("chat.Conversation", 0)
