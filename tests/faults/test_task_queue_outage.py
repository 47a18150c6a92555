"""The task queue (Celery's broker, Redis) down while an admin uploads a file: the upload is stored and
reported, not a 500; once Redis is back, the periodic sweep sends its ingestion and a worker ingests it.

Real processes on a PostgreSQL and a Redis server of this test's own (``tests.dedicated_servers``;
the run's shared Redis is never stopped): a daphne web process (``tests.live_server``) the admin uses
over HTTP, then ``knowledge.send_unsent_sources`` (what Celery beat runs every ``STUCK_WORK_SWEEP_S``)
and a Celery worker, sharing the upload folder (``MEDIA_ROOT``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import requests

from tests.dedicated_servers import dedicated_postgres, dedicated_redis
from tests.faults.test_redis_outage import log_records
from tests.live_server import ROOT, LiveServerError, live_server

DATABASE = "faults_task_queue"
UPLOAD = ("returns.md", b"# Returns\n\nUnworn shoes can be returned within 30 days for a full refund.\n")
QUEUE_WARNING = ("Saved, but the task queue is unreachable, so 1 task(s) did not start now: the ingestion starts "
                 "when the queue is back.")


def admin_session(base_url: str) -> requests.Session:
    """A ``requests`` session logged in to the admin as ``root`` (Django's login form, with its CSRF token)."""
    session = requests.Session()
    session.get(f"{base_url}/admin/login/", timeout=30)
    response = session.post(f"{base_url}/admin/login/?next=/admin/", timeout=30, data={
        "username": "root", "password": "pw-root", "csrfmiddlewaretoken": session.cookies["csrftoken"],
        "next": "/admin/"})
    assert response.url.endswith("/admin/"), response.text[:2000]
    return session


def test_an_upload_while_the_task_queue_is_down_is_kept_and_ingested_once_it_is_back(tmp_path):
    log_path = tmp_path / "daphne.log"
    with dedicated_postgres(DATABASE) as postgres, dedicated_redis() as redis_server:
        environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
                       "DATABASE_URL": postgres.database_url, "REDIS_URL": redis_server.url,
                       "MEDIA_ROOT": str(tmp_path / "media")}
        subprocess.run([sys.executable, "manage.py", "createsuperuser", "--noinput", "--username", "root",
                        "--email", "root@example.com"], cwd=ROOT, check=True, capture_output=True, timeout=120,
                       env={**environment, "DJANGO_SUPERUSER_PASSWORD": "pw-root"})
        try:
            server_context = live_server(DATABASE, log_path=log_path, env={
                key: environment[key] for key in ("DATABASE_URL", "REDIS_URL", "MEDIA_ROOT")})
            server = server_context.__enter__()
        except LiveServerError as error:
            pytest.fail(str(error))
        try:
            session = admin_session(server.url)
            upload_page = session.get(f"{server.url}/admin/knowledge/source/upload/", timeout=30)
            assert upload_page.status_code == 200
            # given the task queue's Redis is down
            redis_server.stop()
            log_before = len(log_path.read_text(errors="replace"))
            # when the admin uploads a file
            response = session.post(f"{server.url}/admin/knowledge/source/upload/", timeout=60,
                                    data={"collection": "default", "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                                    files={"files": UPLOAD}, allow_redirects=False)
            changelist = session.get(f"{server.url}/admin/knowledge/source/", timeout=30)
            outage_log = log_path.read_text(errors="replace")[log_before:]

            # then it is stored, queued and marked unsent, and the admin is told so, without a 500
            assert response.status_code == 302
            assert response.headers["Location"] == "/admin/knowledge/source/"
            assert changelist.status_code == 200
            page = changelist.text.replace("&#x27;", "'")
            assert "1 file(s) queued for ingestion." in page
            assert QUEUE_WARNING in page
            rows = postgres.psql("SELECT uri, status, unsent_at IS NOT NULL, unsent_force, pending_file <> '' "
                                 "FROM knowledge_source")
            assert rows == [("upload:returns.md", "queued", True, False, True)]
            stored = postgres.psql("SELECT pending_file FROM knowledge_source")[0][0]
            assert (tmp_path / "media" / stored).read_bytes() == UPLOAD[1]
            # one WARNING line, no traceback
            assert "Traceback" not in outage_log
            records = [(level, logger, re.sub(r" \(.*\); ", " (...); ", message))
                       for level, logger, message in log_records(outage_log)]
            assert records == [("WARNING", "config.task_queue",
                                "task knowledge.ingest_source not sent, the task queue is unreachable (...); "
                                "the ingestion starts when the queue is back")], outage_log

            # when Redis is back (empty: the task was never in it), the sweep sends the ingestion, and a
            # worker takes it
            redis_server.start()
            sweep = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                                    "from knowledge.tasks import send_unsent_sources; print(send_unsent_sources())"],
                                   cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
            assert sweep.returncode == 0, sweep.stderr
            assert sweep.stdout.strip().splitlines()[-1] == "1"
            worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo",
                                       "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                                      cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / "worker.log", "wb"))
            try:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    status = postgres.psql("SELECT status FROM knowledge_source")[0][0]
                    if status in ("ready", "failed"):
                        break
                    time.sleep(1)
            finally:
                worker.terminate()
                worker.wait(timeout=60)

            # then it is ingested, and the mark is gone
            assert postgres.psql("SELECT status, error, unsent_at IS NULL, chunk_count > 0 FROM knowledge_source") == [
                ("ready", "", True, True)], (tmp_path / "worker.log").read_text(errors="replace")
        finally:
            server_context.__exit__(None, None, None)
