"""Shared fixtures: the real embedding model, the Doc2Dial data set, and a real Celery worker.

Tests run against the real PostgreSQL + pgvector (the embedded server unless DATABASE_URL is set);
pytest-django creates the test database (``TEST_DATABASE_NAME``, default ``test_supportbot``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Resolved: sources record resolved paths, so a symlinked ../shared must compare equal to them.
DOC2DIAL_DIR = Path(os.environ.get("DOC2DIAL_DIR", ROOT.parent / "shared" / "data" / "doc2dial")).resolve()


@pytest.fixture(scope="session")
def doc2dial_dir() -> Path:
    """The Doc2Dial folder (``../shared/data/doc2dial``). Skipped where absent (a user's clone) unless
    ``REQUIRE_DOC2DIAL=1`` (set by ``.ci/run``), which turns the skip into a failure."""
    if not (DOC2DIAL_DIR / "questions_dev.jsonl").exists():
        message = f"Doc2Dial data not found at {DOC2DIAL_DIR} (set DOC2DIAL_DIR)"
        if os.environ.get("REQUIRE_DOC2DIAL") == "1":
            pytest.fail(message + "; REQUIRE_DOC2DIAL=1 makes this a failure")
        pytest.skip(message)
    return DOC2DIAL_DIR


@pytest.fixture(scope="session")
def doc2dial_questions(doc2dial_dir) -> list[dict]:
    """All development questions as dicts (see the data set's README for the fields)."""
    with open(doc2dial_dir / "questions_dev.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="session")
def embedding_model():
    """The real sentence-embedding model of the settings (loaded once per test session; read without the
    database, which a session fixture may not use)."""
    from knowledge.embedding import settings_encoder

    return settings_encoder()


@contextmanager
def _real_celery_worker(concurrency: int):
    from celery.contrib.testing.worker import start_worker

    from config.celery import app

    # A queue of this test run only, so a development worker on the same Redis never takes its tasks.
    previous_queue = app.conf.task_default_queue
    app.conf.task_default_queue = f"test-{os.getpid()}"
    try:
        with start_worker(app, pool="threads", concurrency=concurrency, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=30, queues=[app.conf.task_default_queue]) as worker:
            yield worker
    finally:
        app.conf.task_default_queue = previous_queue


@pytest.fixture
def celery_worker_real(transactional_db):
    """A real Celery worker (threads, same process) consuming the real Redis broker.

    Tests using it must commit their data (``transactional_db``) so the worker's connection sees it.
    """
    with _real_celery_worker(concurrency=1) as worker:
        yield worker


@pytest.fixture
def celery_worker_real_concurrent(transactional_db):
    """Like ``celery_worker_real``, with two worker threads: two tasks run at the same time."""
    with _real_celery_worker(concurrency=2) as worker:
        yield worker
