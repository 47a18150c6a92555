"""Celery tasks of the chat app: thin wrappers around its services, run by Celery beat
(``CELERY_BEAT_SCHEDULE`` in ``config.settings``; editable in the admin's periodic tasks)."""

from __future__ import annotations

from celery import shared_task

from chat import retention, services


@shared_task(name="chat.expire_empty_conversations")
def expire_empty_conversations() -> int:
    """Delete conversations that never got a message, once older than ``CONVERSATION_EMPTY_TTL_S``
    (``chat.retention.conversations_expire_empty``). Returns how many; safe to run twice."""
    return retention.conversations_expire_empty()


@shared_task(name="chat.embed_unanswered_questions")
def embed_unanswered_questions() -> int:
    """Embed the unanswered questions that have no vector of the current embedding model yet, so the
    analytics page can group them (``chat.services.unanswered_questions_embed``). Returns how many
    were stored; safe to run twice."""
    return services.unanswered_questions_embed()
