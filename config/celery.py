"""Celery application; tasks are discovered in each app's ``tasks.py``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("supportbot")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# Tasks that run for minutes (fine-tunes with their evaluations) and go to the TUNING_QUEUE queue.
TUNING_TASKS = frozenset({"tuning.fine_tune_run", "tuning.embedder_run"})


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router (``CELERY_TASK_ROUTES``): tasks in ``TUNING_TASKS`` go to ``settings.TUNING_QUEUE``,
    read at send time (Celery caches its router, not this function's answer); others take the default
    queue (``None``)."""
    if name in TUNING_TASKS:
        from django.conf import settings

        return {"queue": settings.TUNING_QUEUE}
    return None
