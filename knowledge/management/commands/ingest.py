"""``manage.py ingest PATH_OR_URL... [--collection NAME]``: queue files and folders for ingestion
(Celery ``knowledge.ingest_sources`` tasks of ``INGEST_TASK_SOURCES`` files) and show progress until
every source is ready or failed; with ``--sync`` ingest them in this process
(``services.documents_ingest``: chunks of several files embedded together). An ``http(s)://``
argument registers (or updates) a website source and syncs it, printing its report."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from knowledge import crawler, services, websites
from knowledge.models import DEFAULT_COLLECTION, Source, Website, WebsiteSync

_DONE = {Source.Status.READY, Source.Status.FAILED}


class Command(BaseCommand):
    help = "Ingest files and folders (.md .txt .html .pdf .docx, .csv FAQ sheets) into the knowledge base."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help="files or folders (walked recursively), or website URLs")
        parser.add_argument("--collection", default=DEFAULT_COLLECTION)
        parser.add_argument("--prune", action="store_true",
                            help="delete sources under the given folders whose files are gone")
        parser.add_argument("--sync", action="store_true",
                            help="ingest in this process instead of queuing Celery tasks")
        parser.add_argument("--force", action="store_true",
                            help="re-parse and re-embed even files whose content is unchanged")
        parser.add_argument("--no-wait", action="store_true", help="queue and return at once")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
        site = parser.add_argument_group("websites (http(s):// arguments)")
        site.add_argument("--sitemap", action="store_true",
                          help="the URL is a sitemap (default for URLs ending in .xml); else a crawl starts there")
        site.add_argument("--include", action="append", default=None, metavar="GLOB",
                          help="keep only pages whose path matches (repeatable), e.g. '/help/*'")
        site.add_argument("--exclude", action="append", default=None, metavar="GLOB", help="skip these paths (repeatable)")
        site.add_argument("--page-limit", type=int, default=None, help="most pages kept (default 500)")
        site.add_argument("--depth", type=int, default=None, help="crawl: most links followed from the start page (default 3)")
        site.add_argument("--resync-hours", type=int, default=None, help="re-sync period in hours, 0 = never (default 24)")

    def handle(self, *args, paths, collection, prune, sync, force, no_wait, timeout, **options):
        urls = [p for p in paths if p.lower().startswith(("http://", "https://"))]
        paths = [p for p in paths if p not in urls]
        for url in urls:
            self._website(url, collection=collection, sync=sync, no_wait=no_wait, timeout=timeout, **options)
        if not paths:
            return
        try:
            result = services.sources_register_paths(
                paths, collection=collection, prune=prune, enqueue=not sync, force=force
            )
        except FileNotFoundError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"{len(result.queued)} queued, {len(result.unchanged)} unchanged, {result.pruned} pruned "
            f"(collection {collection!r})"
        )
        ids = [source.pk for source in result.queued]
        if sync:
            with tqdm(total=len(ids), desc="ingesting", unit="file") as bar:
                services.documents_ingest(ids, force=force, on_result=lambda result: bar.update(1))
        elif ids and not no_wait:
            self._wait(ids, timeout)
        if not no_wait:
            self._summary(ids)

    def _wait(self, ids, timeout):
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        warned = False
        with tqdm(total=len(ids) * 100, desc="ingesting", unit="%", bar_format="{l_bar}{bar}| {postfix}") as bar:
            while True:
                rows = list(Source.objects.filter(pk__in=ids).values_list("status", "progress"))
                done = sum(1 for status, _ in rows if status in _DONE)
                progress = sum(100 if status in _DONE else progress for status, progress in rows)
                bar.n = progress
                bar.set_postfix_str(f"{done}/{len(ids)} files")
                bar.refresh()
                if done == len(rows):
                    return
                if not warned and time.monotonic() - started > 30 and progress == 0:
                    self.stderr.write("nothing has started after 30 s: is a Celery worker running? "
                                      "(python dev.py run starts one; or use --sync)")
                    warned = True
                if time.monotonic() > deadline:
                    raise CommandError(f"timed out after {timeout:g} s; ingestion continues in the worker")
                time.sleep(0.5)

    def _summary(self, ids):
        failed = Source.objects.filter(pk__in=ids, status=Source.Status.FAILED)
        ready = Source.objects.filter(pk__in=ids, status=Source.Status.READY)
        chunks = sum(ready.values_list("chunk_count", flat=True))
        self.stdout.write(self.style.SUCCESS(f"{ready.count()} ready ({chunks} chunks), {failed.count()} failed"))
        for source in failed:
            self.stdout.write(self.style.ERROR(f"  failed: {source.uri}: {source.error}"))

    def _website(self, url, *, collection, sync, no_wait, timeout, sitemap, include, exclude, page_limit, depth,
                 resync_hours, **options):
        if page_limit is not None and page_limit < 1:
            raise CommandError("--page-limit must be at least 1")
        if depth is not None and depth < 0:
            raise CommandError("--depth cannot be negative")
        if resync_hours is not None and resync_hours < 0:
            raise CommandError("--resync-hours cannot be negative")
        try:
            website = websites.website_register(
                url, collection=collection, mode=Website.Mode.SITEMAP if sitemap else None, include=include,
                exclude=exclude, page_limit=page_limit, max_depth=depth, resync_hours=resync_hours,
            )
        except crawler.AddressRefused as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"website {website.url} ({website.get_mode_display().lower()}, collection {collection!r})")
        if sync:
            run = websites.website_sync(website.pk)
        else:
            run = websites.website_sync_queue(website)
            if no_wait:
                self.stdout.write(f"sync #{run.pk} queued")
                return
            run = self._wait_sync(run.pk, timeout)
        self._sync_summary(run)

    def _wait_sync(self, sync_id, timeout):
        started = time.monotonic()
        deadline = started + timeout
        warned = False
        with tqdm(desc="syncing", unit="page") as bar:
            while True:
                run = WebsiteSync.objects.get(pk=sync_id)
                if not warned and run.status == WebsiteSync.Status.QUEUED and time.monotonic() - started > 30:
                    self.stderr.write("the sync has not started after 30 s: is a Celery worker running? "
                                      "(python dev.py run starts one; or use --sync)")
                    warned = True
                bar.total, bar.n = run.total or None, run.done
                bar.set_postfix_str(run.current_url[-60:])
                bar.refresh()
                if run.status in (WebsiteSync.Status.FINISHED, WebsiteSync.Status.FAILED):
                    return run
                if time.monotonic() > deadline:
                    raise CommandError(f"timed out after {timeout:g} s; the sync continues in the worker")
                time.sleep(0.5)

    def _sync_summary(self, run):
        style = self.style.SUCCESS if run.status == WebsiteSync.Status.FINISHED else self.style.ERROR
        self.stdout.write(style(
            f"sync #{run.pk} {run.status}: {run.new} new, {run.changed} changed, {run.unchanged} unchanged, "
            f"{run.removed} removed, {run.failed} failed, {run.skipped} skipped"
        ))
        if run.error:
            self.stdout.write(self.style.ERROR(f"  {run.error}"))
        for page in run.pages:
            if page["outcome"] in ("failed", "removed", "skipped"):
                self.stdout.write(f"  {page['outcome']}: {page['url']}: {page['reason']}")
