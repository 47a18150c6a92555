"""Celery workers (ingestion, tuning) run at a lower CPU priority than the processes that answer
customers (``WORKER_NICENESS``, ``config.celery``). Each case runs in a subprocess: a nice value, once
raised, cannot be lowered again without privileges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import os, django
django.setup()
from celery.signals import worker_init
import config.celery  # connects the handler, as `celery -A config worker` imports it
worker_init.send(sender=None)  # what a starting worker sends before it forks its pool
print(os.nice(0))
"""


def run_worker_start(niceness: str, *, start_at: int = 0) -> int:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
           "WORKER_NICENESS": niceness}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, preexec_fn=(lambda: os.nice(start_at)) if start_at else None)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


def test_a_starting_worker_lowers_its_priority_to_the_setting():
    assert run_worker_start("10") == 10


def test_a_worker_never_raises_its_priority_and_the_value_is_capped_at_19():
    assert run_worker_start("5", start_at=12) == 12
    assert run_worker_start("40") == 19
