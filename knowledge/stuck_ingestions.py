"""Ingestions that stopped: sources left in ``parsing`` or ``embedding`` by a worker that died.

Ingestion reports progress on the source as it goes (``status``, ``progress`` and ``updated_at``
move at each step and each embedded batch), so a source in ``parsing`` or ``embedding`` whose
``updated_at`` is older than ``INGEST_STUCK_S`` has no worker behind it any more: the worker's pool
process was killed (out of memory, ``kill -9``, a host restart) after the task began. The task itself
is redelivered (``knowledge.ingest_source`` and ``knowledge.ingest_sources`` are ``acks_late`` with
``reject_on_worker_lost``; a redelivered batch becomes one ``ingest_source`` per unfinished source), at
most ``INGEST_MAX_DELIVERIES`` times (``ingest_delivery_count``: a file that kills its worker every time
must not loop for ever); the periodic ``knowledge.fail_stuck_sources`` (Celery beat) fails whatever is
still stuck with a reason, so ``manage.py ingest`` and the admin stop waiting. The chunks of the
source's previous version are untouched and keep serving.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from knowledge.models import Source

STUCK_STATUSES = (Source.Status.PARSING, Source.Status.EMBEDDING)
# Redis key of a task's delivery counter (``ingest_delivery_count``), kept for a day.
_DELIVERIES_KEY = "knowledge:ingest-deliveries:{task_id}"
_DELIVERIES_TTL_S = 24 * 3600


def stuck_reason(status: str, stuck_s: float) -> str:
    """The error recorded on a source failed by ``sources_fail_stuck``."""
    return (f"ingestion stopped during {status}: no progress for {int(stuck_s)} s (the worker was probably killed, "
            "e.g. out of memory); the previous version keeps serving. Upload the file again or re-run the ingestion.")


def sources_fail_stuck(*, stuck_s: float | None = None, now=None) -> int:
    """Mark ``failed`` every source in ``parsing`` or ``embedding`` without progress (``updated_at``)
    for ``stuck_s`` seconds (default ``settings.INGEST_STUCK_S``), with ``stuck_reason`` as its error.
    Returns how many. Each row is a conditional update (still stuck, still not moved), so a worker
    reporting progress at the same moment wins and the sweep is safe to run concurrently. Serving
    chunks are not touched."""
    stuck_s = settings.INGEST_STUCK_S if stuck_s is None else stuck_s
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=stuck_s)
    failed = 0
    for status in STUCK_STATUSES:
        failed += Source.objects.filter(status=status, updated_at__lt=cutoff).update(
            status=Source.Status.FAILED, error=stuck_reason(status, stuck_s), progress=0, updated_at=now,
        )
    return failed


def ingest_delivery_count(task_id: str | None) -> int:
    """Count one more delivery of ingestion task ``task_id`` (Celery's task id, the same on each
    redelivery) in the product's Redis and return the count (1 on the first delivery; 1 when
    ``task_id`` is ``None``, e.g. an eager call). Raises ``redis.RedisError`` when Redis is down."""
    if not task_id:
        return 1
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    try:
        key = _DELIVERIES_KEY.format(task_id=task_id)
        count = client.incr(key)
        client.expire(key, _DELIVERIES_TTL_S)
        return int(count)
    finally:
        client.close()
