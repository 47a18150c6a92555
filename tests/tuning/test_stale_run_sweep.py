"""The periodic sweep fails fine-tune runs whose worker stopped reporting (``tuning.fail_stale_runs``)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from tuning.models import FineTuneRun, TrainingDataset
from tuning.tasks import fail_stale_runs

pytestmark = pytest.mark.django_db


def test_a_run_silent_past_the_timeout_is_failed_by_the_periodic_sweep(settings):
    # given a run whose tuner was killed two hours ago, and a finished one
    settings.TUNING_RUN_STALE_S = 900
    dataset = TrainingDataset.objects.create(version=1, sha256="c" * 64, recipe={"method": "raft"})
    finished = FineTuneRun.objects.create(dataset=dataset, status="succeeded", base_model_path="/m.gguf",
                                          base_model_sha256="a" * 64)
    killed = FineTuneRun.objects.create(dataset=dataset, status="training", base_model_path="/m.gguf",
                                        base_model_sha256="a" * 64, heartbeat_at=timezone.now() - timedelta(hours=2))

    # when the sweep runs
    assert fail_stale_runs() == 1

    # then the silent run is failed with the reason, the finished one untouched
    killed.refresh_from_db()
    assert killed.status == "failed"
    assert killed.error.startswith("the worker stopped reporting during training")
    assert FineTuneRun.objects.get(pk=finished.pk).status == "succeeded"
    assert django_settings.CELERY_BEAT_SCHEDULE["tuning.fail_stale_runs"] == {
        "task": "tuning.fail_stale_runs", "schedule": django_settings.STUCK_WORK_SWEEP_S}
