"""Website syncs through the real Celery path: ``website_sync_queue`` enqueues ``knowledge.sync_website``
on commit and a real worker (threads, same process, real Redis broker) runs it against a local site;
the run's progress is visible to other connections while it runs."""

from __future__ import annotations

import threading
import time

import pytest
from celery.signals import task_postrun

from knowledge import websites
from knowledge.models import Source, WebsiteSync
from knowledge.tasks import sync_website
from tests.knowledge.website_server import Site, html_page

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def website_settings(settings):
    settings.WEBSITE_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.WEBSITE_REQUEST_INTERVAL_S = 0.0


@pytest.fixture
def site():
    server = Site().start()
    yield server
    server.stop()


class FinishedSyncs:
    """Return values of ``knowledge.sync_website`` runs, in the order the worker finished them."""

    def __init__(self):
        self.results: list[dict] = []
        self._changed = threading.Condition()

    def record(self, sender=None, task=None, retval=None, **kwargs):
        if task is not None and task.name == "knowledge.sync_website":
            with self._changed:
                self.results.append(retval)
                self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.results) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {len(self.results)} of {count} syncs finished"
                self._changed.wait(remaining)
            return list(self.results)


@pytest.fixture
def finished(celery_worker_real, embedding_model):
    syncs = FinishedSyncs()
    task_postrun.connect(syncs.record, weak=False)
    try:
        yield syncs
    finally:
        task_postrun.disconnect(syncs.record)


def test_queued_sync_runs_in_the_worker_with_live_progress_and_is_safe_to_run_twice(finished, site):
    # given a site whose second page is held back until the test has looked at the progress
    release = threading.Event()
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/slow"]))
    site.page("/slow", html_page("Slow", "<p>Returns are accepted within 30 days.</p>"))
    site.routes["/slow"].before = lambda: release.wait(120)
    website = websites.website_register(site.url("/"))
    # when a sync is queued (enqueued when the transaction commits)
    run = websites.website_sync_queue(website)
    # then, while the worker waits for /slow, this connection sees the run's progress: the home page
    # handled and waiting for its batch (the pages are ingested together once fetched)
    deadline = time.monotonic() + 120
    while WebsiteSync.objects.get(pk=run.pk).done < 1:
        assert time.monotonic() < deadline, "the sync made no progress"
        time.sleep(0.2)
    live = WebsiteSync.objects.get(pk=run.pk)
    assert (live.status, live.done, live.new, live.current_url) == ("running", 1, 0, site.url("/"))
    assert live.pages == [{"url": site.url("/"), "outcome": "ingesting", "reason": ""}]
    assert Source.objects.get(uri=site.url("/")).status == "queued"
    assert live.total >= 2
    release.set()
    # and the worker finishes it: both pages are sources
    [result] = finished.wait_for(1)
    assert result == {"website_id": website.pk, "sync_id": run.pk, "status": "finished", "error": "",
                      "new": 2, "changed": 0, "unchanged": 0, "removed": 0, "failed": 0, "skipped": 0}
    assert sorted(Source.objects.values_list("uri", "status")) == [(site.url("/"), "ready"), (site.url("/slow"), "ready")]
    assert threading.current_thread().name not in {"test-website"}
    # when the same task is delivered again, it leaves the finished run as it was
    requests_before = len(site.requests)
    sync_website.delay(website.pk, run.pk)
    assert finished.wait_for(2)[1] == result
    assert len(site.requests) == requests_before
    # and the schedule's call (the website only) makes a run of its own
    sync_website.delay(website.pk)
    third = finished.wait_for(3)[2]
    assert third["sync_id"] != run.pk and (third["status"], third["unchanged"]) == ("finished", 2)


def test_ingest_command_queues_the_sync_and_waits_for_the_worker(finished, site):
    import io

    from django.core.management import call_command

    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/a"]))
    site.page("/a", html_page("A", "<p>Returns are accepted within 30 days.</p>"))
    out = io.StringIO()
    call_command("ingest", site.url("/"), "--timeout", "120", stdout=out, stderr=io.StringIO())
    assert "finished: 2 new, 0 changed, 0 unchanged, 0 removed, 0 failed, 0 skipped" in out.getvalue()
    assert finished.wait_for(1)[0]["new"] == 2
