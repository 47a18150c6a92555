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


@shared_task(name="tuning.fail_stale_runs")
def fail_stale_runs() -> int:
    """Periodic sweep (``CELERY_BEAT_SCHEDULE``, every ``STUCK_WORK_SWEEP_S``): mark failed, with the
    reason, every in-progress fine-tune run whose worker stopped reporting for ``TUNING_RUN_STALE_S``
    (``tuning.fine_tuning.runs_fail_stale``), so a killed tuner does not leave a run "training" until
    the next start or hourly check; likewise embedder runs (``tuning.embedder_runs.
    embedder_runs_fail_stale``, which also fails their half-built embedding versions). Returns how
    many; safe to run twice."""
    from tuning.embedder_runs import embedder_runs_fail_stale
    from tuning.fine_tuning import runs_fail_stale

    return runs_fail_stale() + embedder_runs_fail_stale()


@shared_task(name="tuning.fine_tune_run", acks_late=True)
def fine_tune_run(run_id: int) -> str:
    """Execute fine-tune run ``run_id`` (``tuning.fine_tuning.fine_tune_run_execute``): train,
    export, check parity, evaluate, gate, promote. Safe to deliver twice (only a queued run is
    claimed). Returns the run's final status."""
    from tuning.fine_tuning import fine_tune_run_execute

    return fine_tune_run_execute(run_id).status


@shared_task(name="tuning.fine_tune_scheduled")
def fine_tune_scheduled() -> int | None:
    """Periodic check (``CELERY_BEAT_SCHEDULE``, editable in the admin's periodic tasks): start a
    run when enough new approved corrections exist (``fine_tune_scheduled_check``). Returns the id
    of the run started, or ``None``."""
    from tuning.fine_tuning import fine_tune_scheduled_check

    run = fine_tune_scheduled_check()
    return run.pk if run else None


@shared_task(name="tuning.embedder_run", acks_late=True)
def embedder_run(run_id: int) -> str:
    """Execute embedder run ``run_id`` (``tuning.embedder_runs.embedder_run_execute``): fine-tune the
    embedding model on the run's snapshot, re-embed into the candidate's shadow vectors, gate, and
    promote a winner. Safe to deliver twice (only a queued run is claimed). Returns the run's final status."""
    from tuning.embedder_runs import embedder_run_execute

    return embedder_run_execute(run_id).status


@shared_task(name="tuning.embedder_run_scheduled")
def embedder_run_scheduled() -> int | None:
    """Periodic check (``CELERY_BEAT_SCHEDULE``, beside the generator's): start an embedder run when
    enough approved corrections are new since the last one (``embedder_run_scheduled_check``).
    Returns the id of the run started, or ``None``."""
    from tuning.embedder_runs import embedder_run_scheduled_check

    run = embedder_run_scheduled_check()
    return run.pk if run else None
