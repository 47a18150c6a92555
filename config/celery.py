"""Celery application; tasks are discovered in each app's ``tasks.py``."""

import os

from celery import Celery
from celery.signals import worker_init

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


def worker_niceness_apply(target: int) -> int:
    """Lower this process's CPU priority to the nice value ``target`` (0-19; never raised, which would
    need privileges); returns the nice value now. Child processes (the prefork pool, llama.cpp and
    torch threads) inherit it."""
    current = os.nice(0)
    if target > current:
        current = os.nice(min(target, 19) - current)
    return current


@worker_init.connect
def _worker_niceness(**kwargs) -> None:
    """Celery workers (ingestion, tuning) run at ``WORKER_NICENESS``, so on a host they share with
    the model server and web processes, chat keeps its share of the cores (README, "Model server")."""
    from django.conf import settings

    worker_niceness_apply(settings.WORKER_NICENESS)
