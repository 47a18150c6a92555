"""Fault test: the pool process of a real Celery worker (prefork, in a subprocess, on the real Redis
broker and the test database) is killed with SIGKILL in the middle of an ingestion. The task is
redelivered (``acks_late`` + ``reject_on_worker_lost``) and the source ends ready with all its chunks,
instead of staying in "embedding" for ever as it did with ``acks_late`` alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from django.db import connection

from knowledge import services
from knowledge.models import Chunk, Source
from knowledge.tasks import ingest_source

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


def long_manual(paragraphs: int = 500) -> str:
    """A Markdown manual long enough that embedding it takes a while (many chunks)."""
    parts = ["# Product care manual\n"]
    for n in range(paragraphs):
        parts.append(f"## Part {n}\n\nPart {n} of the tent kit is cleaned with lukewarm water and mild soap number {n}. "
                     f"Dry it in the shade for {n % 9 + 2} hours before storing it in bag {n * 7 % 31}. "
                     f"The warranty for part {n} lasts {n % 5 + 1} years when it is registered within {n % 40 + 10} days.\n")
    return "\n".join(parts)


def wait_until(predicate, timeout_s: float, what: str, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text(errors='replace')[-4000:]}")


def test_a_worker_killed_mid_ingestion_gets_its_task_redelivered_and_the_source_ends_ready(tmp_path):
    # given a long file registered for ingestion, its task on a queue of this test only
    path = tmp_path / "manual.md"
    path.write_text(long_manual(), encoding="utf-8")
    source = services.sources_register_paths([path], enqueue=False).queued[0]
    queue = f"test-worker-lost-{os.getpid()}"
    ingest_source.apply_async(args=[source.pk], queue=queue)

    # and a real prefork worker with one pool process consuming that queue
    log = tmp_path / "worker.log"
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
                   "DATABASE_NAME": connection.settings_dict["NAME"]}
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool=prefork", "--concurrency=1",
             f"--queues={queue}", f"--hostname=lost-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
             "--loglevel=INFO"],
            cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        # when its pool process is killed while embedding
        def embedding():
            row = Source.objects.filter(pk=source.pk).values_list("status", "progress").get()
            return row[0] == "embedding" and row[1] > 10
        wait_until(embedding, 240, "the ingestion to be embedding", log)
        children = psutil.Process(worker.pid).children()
        assert len(children) == 1, children
        killed = children[0].pid
        os.kill(killed, signal.SIGKILL)

        # then a new pool process takes the redelivered task and the source ends ready
        def finished():
            status = Source.objects.filter(pk=source.pk).values_list("status", flat=True).get()
            return status if status in ("ready", "failed") else None
        assert wait_until(finished, 300, "the source to finish", log) == "ready", log.read_text(errors="replace")[-4000:]
        assert "WorkerLostError" in log.read_text(errors="replace")
        assert killed not in [child.pid for child in psutil.Process(worker.pid).children()]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()

    source.refresh_from_db()
    assert (source.status, source.error, source.progress) == ("ready", "", 100)
    assert source.chunk_count == Chunk.objects.filter(source=source).count() > 20
