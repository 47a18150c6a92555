"""Celery tasks of the tuning app: thin wrappers around ``tuning.services``.

``flag_stale_corrections`` runs on Celery beat (``CELERY_BEAT_SCHEDULE`` in ``config.settings``; beat
uses django-celery-beat's database scheduler, which copies the entry into the admin's periodic tasks
where its interval can be changed). It is how corrections learn that the knowledge base changed
under them: ``knowledge`` must not import ``tuning`` (dependencies run tuning -> chat -> knowledge),
so ingestion and deletion do not call it; the export and the review re-check staleness themselves.
"""

from __future__ import annotations

from celery import shared_task

from tuning import services


@shared_task(name="tuning.flag_stale_corrections")
def flag_stale_corrections() -> int:
    """Flag every correction whose sources changed or were deleted since it was written
    (``services.corrections_flag_stale``). Returns how many were flagged; safe to run twice and
    concurrently (each flag is a conditional update)."""
    return services.corrections_flag_stale()

