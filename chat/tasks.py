"""Celery tasks of the chat app: thin wrappers around its services, run by Celery beat
(``CELERY_BEAT_SCHEDULE`` in ``config.settings``; editable in the admin's periodic tasks)."""

from __future__ import annotations

from celery import shared_task

from chat import retention


@shared_task(name="chat.expire_empty_conversations")
def expire_empty_conversations() -> int:
    """Delete conversations that never got a message, once older than ``CONVERSATION_EMPTY_TTL_S``
    (``chat.retention.conversations_expire_empty``). Returns how many; safe to run twice."""
    return retention.conversations_expire_empty()
