"""Website sources: registering a website, its re-sync schedule, and syncing its pages.

A sync (``website_sync``) finds the website's pages (a crawl from the start page, or the sitemap's
list), fetches each through ``knowledge.crawler.Fetcher`` and makes each kept page a source of kind
``page`` whose ``uri`` is its canonical URL. Page bytes go through the same batched ingestion as
uploaded files and folders (``services.documents_ingest`` from pending files): the changed and new
pages are stored as pending versions while the crawl goes on and ingested together, up to
``INGEST_TASK_SOURCES`` pages at a time (their chunks embedded in shared rounds of
``INGEST_BATCH_CHUNKS``), each page's chunks still swapped in its own transaction. A page whose bytes
hash to the serving version, or whose title and extracted text are the serving version's (only its
menu, scripts or other markup changed), is left alone; a page that cannot be parsed is marked failed
and its serving version stays. A page waiting for its batch is counted as handled and listed in
the report as ``ingesting``; it gets its outcome (new, changed or failed) when its batch is done.
Pages gone from the site (404/410, no longer in the sitemap, now disallowed by robots.txt or by the
website's patterns, over its page limit) are deleted. A page is kept once: under its canonical URL
(``<link rel="canonical">`` within the site, else the URL its redirects end at), and a page whose
extracted text equals a kept page's is skipped.
Every run writes a ``WebsiteSync`` report, updated after each page.

Conditional requests: a page's ETag / Last-Modified are stored with its serving version and sent back
(If-None-Match / If-Modified-Since); a 304 is "unchanged" with nothing downloaded. A crawl needs the
links of the pages it expands, so those (pages above ``max_depth``) are fetched in full and only the
content hash decides; sitemap pages and the crawl's leaves are asked conditionally.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone

from config.task_queue import task_enqueue_on_commit, unsent_reason
from knowledge import crawler, services
from knowledge import embedding as embedding_module
from knowledge.models import DEFAULT_COLLECTION, Source, Website, WebsiteSync
from knowledge.parsers import ParsedDocument, ParseError, parse_file

logger = logging.getLogger(__name__)

SYNC_TASK = "knowledge.sync_website"


# --- registering and scheduling -------------------------------------------------------------------


def website_clean_url(url: str) -> str:
    """``url`` normalized (``crawler.normalize_url``); raises ``crawler.AddressRefused`` for a scheme
    other than http(s) or a URL without a host. Addresses are checked when fetching, not here (a
    name's DNS answer may change)."""
    return crawler.normalize_url(url)


@transaction.atomic
def website_save(website: Website, *, sync: bool = False) -> Website:
    """Save ``website`` (its URL normalized), keep its beat schedule in step with ``resync_hours``
    and, with ``sync``, queue a sync now. Raises ``crawler.AddressRefused`` for a non-http(s) URL
    (nothing saved)."""
    website.url = website_clean_url(website.url)
    website.save()
    website_schedule_update(website)
    if sync:
        website_sync_queue(website)
    return website


@transaction.atomic
def website_register(url: str, *, collection: str = DEFAULT_COLLECTION, mode: str | None = None,
                     include: list[str] | None = None, exclude: list[str] | None = None,
                     page_limit: int | None = None, max_depth: int | None = None,
                     resync_hours: int | None = None) -> Website:
    """Create the website ``url`` of ``collection``, or update the given settings of an existing one
    (what ``manage.py ingest https://...`` does). ``mode`` defaults to ``sitemap`` for a URL ending
    in ``.xml`` / ``.xml.gz`` and ``crawl`` otherwise. Raises ``crawler.AddressRefused`` for a
    non-http(s) URL. Does not queue a sync."""
    url = website_clean_url(url)
    website = Website.objects.filter(collection=collection, url=url).first() or Website(collection=collection, url=url)
    if mode is None and website.pk is None:
        path = crawler.path_of(url).split("?", 1)[0].lower()
        mode = Website.Mode.SITEMAP if path.endswith((".xml", ".xml.gz")) else Website.Mode.CRAWL
    for name, value in (("mode", mode), ("page_limit", page_limit), ("max_depth", max_depth),
                        ("resync_hours", resync_hours)):
        if value is not None:
            setattr(website, name, value)
    if include is not None:
        website.include_patterns = "\n".join(include)
    if exclude is not None:
        website.exclude_patterns = "\n".join(exclude)
    return website_save(website)


def website_schedule_update(website: Website) -> None:
    """Create, update or delete the django-celery-beat task that re-syncs ``website`` every
    ``resync_hours`` hours (0: no task). An existing task keeps its ``enabled`` flag, so a schedule
    paused in the admin's Periodic tasks stays paused."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    task = website.schedule
    if not website.resync_hours:
        if task is not None:
            Website.objects.filter(pk=website.pk).update(schedule=None)
            website.schedule = None
            task.delete()
        return
    interval, _ = IntervalSchedule.objects.get_or_create(every=website.resync_hours, period=IntervalSchedule.HOURS)
    if task is None:
        task = PeriodicTask(name=f"Re-sync website #{website.pk}", enabled=True)
    task.interval = interval
    task.task = SYNC_TASK
    task.args = json.dumps([website.pk])
    task.description = f"Re-sync {website.url[:150]} (collection {website.collection})"
    task.save()
    if website.schedule_id != task.pk:
        website.schedule = task
        Website.objects.filter(pk=website.pk).update(schedule=task)


@transaction.atomic
def website_delete(website: Website) -> None:
    """Delete ``website``, its pages (and their chunks), its sync reports and its schedule."""
    services.sources_delete(website.pages.all())
    if website.schedule_id:
        website.schedule.delete()
    website.delete()


@transaction.atomic
def website_sync_queue(website: Website) -> WebsiteSync:
    """Record a queued sync of ``website`` and enqueue its task when the transaction commits. When
    the task queue is unreachable (``config.task_queue``) the run is marked failed with the reason
    instead (the website and its pages are untouched; sync again, or its schedule will)."""
    from knowledge.tasks import sync_website

    run = WebsiteSync.objects.create(website=website)
    task_enqueue_on_commit(sync_website, (website.pk, run.pk), on_unsent=lambda: WebsiteSync.objects.filter(
        pk=run.pk, status=WebsiteSync.Status.QUEUED).update(status=WebsiteSync.Status.FAILED,
                                                            error=unsent_reason("sync"), finished_at=timezone.now()),
        later="the sync was marked failed; sync again once the queue is back")
    return run


# --- syncing --------------------------------------------------------------------------------------


class SyncCancelled(Exception):
    """The run's row (or its website) was deleted while it ran; the sync stops."""


def website_sync(website_id: int, sync_id: int | None = None, *, fetcher: crawler.Fetcher | None = None) -> WebsiteSync | None:
    """Sync website ``website_id`` now; returns its report, ``None`` if the website is gone.

    ``sync_id`` names a queued run (``website_sync_queue``); without it a run is created (the beat
    schedule). Safe to run twice: a run that is not queued is returned as it is, and a website with
    another run in progress (updated within ``WEBSITE_SYNC_STALE_S``) gets this run marked failed
    with that reason. A failure to read the start page or the sitemap fails the run and removes
    nothing. A website (or run) deleted while it syncs stops the run and returns ``None``. ``fetcher`` is for tests (default: a ``crawler.Fetcher`` of the website's site).
    Side effects: sources created, re-ingested and deleted; the run's row updated after each page.
    """
    run = _run_start(website_id, sync_id)
    if run is None or run.status != WebsiteSync.Status.RUNNING:
        return run
    website = run.website
    own_fetcher = fetcher is None
    try:
        fetcher = fetcher or crawler.Fetcher(crawler.site_hosts(website.url))
        try:
            _Sync(website, run, fetcher).run()
        finally:
            if own_fetcher:
                fetcher.close()
    except SyncCancelled as error:
        logger.info("website %s: %s", website_id, error)
        return None
    except crawler.FetchError as error:
        _run_finish(run, WebsiteSync.Status.FAILED, str(error))
    except Exception as error:
        _run_finish(run, WebsiteSync.Status.FAILED, f"internal error: {type(error).__name__}: {error}")
        raise
    else:
        _run_finish(run, WebsiteSync.Status.FINISHED)
        Website.objects.filter(pk=website.pk).update(last_synced_at=timezone.now())
    return run


def _run_start(website_id: int, sync_id: int | None) -> WebsiteSync | None:
    with transaction.atomic():
        website = Website.objects.select_for_update().filter(pk=website_id).first()
        if website is None:
            return None
        if sync_id is not None:
            run = WebsiteSync.objects.filter(pk=sync_id, website=website).first()
            if run is None or run.status != WebsiteSync.Status.QUEUED:
                return run
        else:
            run = WebsiteSync.objects.create(website=website)
        active = WebsiteSync.objects.filter(website=website, status=WebsiteSync.Status.RUNNING).exclude(pk=run.pk)
        stale_before = timezone.now() - timedelta(seconds=settings.WEBSITE_SYNC_STALE_S)
        active.filter(updated_at__lt=stale_before).update(
            status=WebsiteSync.Status.FAILED, error="stopped without finishing (its worker was lost)",
            finished_at=timezone.now(),
        )
        other = active.filter(updated_at__gte=stale_before).first()
        if other is not None:
            run.status, run.error, run.finished_at = (
                WebsiteSync.Status.FAILED, f"sync #{other.pk} of this website is still running", timezone.now())
        else:
            run.status, run.started_at = WebsiteSync.Status.RUNNING, timezone.now()
        run.save()
        return run


def _run_finish(run: WebsiteSync, status: str, error: str = "") -> None:
    run.status, run.error, run.finished_at, run.current_url = status, error, timezone.now(), ""
    WebsiteSync.objects.filter(pk=run.pk).update(
        status=status, error=error, finished_at=run.finished_at, current_url="", updated_at=run.finished_at)


@dataclass(frozen=True)
class _PendingPage:
    """A page stored as its source's pending version, waiting for its batch (``_Sync.flush``):
    ``report_index`` is its ``ingesting`` line in the report, ``validators`` the ETag /
    Last-Modified stored once it is ingested, ``was_serving`` whether an earlier version serves."""

    uri: str
    source_id: int
    was_serving: bool
    validators: dict
    text_digest: str
    report_index: int


@dataclass
class _Visit:
    """What visiting one URL gave: the links found (crawl), and whether the page was kept."""

    links: list[str] = field(default_factory=list)
    kept: bool = False


class _Sync:
    """One run over one website (state of the run; ``run()`` does the work)."""

    def __init__(self, website: Website, run: WebsiteSync, fetcher: crawler.Fetcher):
        self.website, self.report, self.fetcher = website, run, fetcher
        self.site = crawler.site_hosts(website.url)
        self.include = crawler.patterns_from_text(website.include_patterns)
        self.exclude = crawler.patterns_from_text(website.exclude_patterns)
        self.known = {s.uri: s for s in website.pages.all()}
        self.kept: set[str] = set()  # canonical URLs kept this run
        self.requested: set[str] = set()  # URLs asked for this run (before redirects)
        # SHA-256 of a page's extracted text -> its canonical URL: the same text under two URLs
        # (print views, tracking parameters without a canonical link) is kept once.
        self.text_hashes: dict[str, str] = {
            _sha256(s.text): s.uri for s in website.pages.filter(status=Source.Status.READY).only("uri", "text")
        }
        self.moved: dict[str, str] = {}  # known URL -> the other canonical URL it led to this run
        self.pending_total = 0
        self.to_ingest: list[_PendingPage] = []  # stored as pending versions, waiting for their batch

    # -- the report --

    def record(self, url: str, outcome: str, reason: str = "") -> None:
        """Add a page to the report and save the run (progress visible to other connections).
        ``outcome`` ``"ingesting"`` (a page waiting for its batch) counts as handled but in no
        outcome's count until ``resolve`` gives it its outcome."""
        run = self.report
        if outcome != "ingesting":
            setattr(run, outcome, getattr(run, outcome) + 1)
        run.pages = [*run.pages, {"url": url, "outcome": outcome, "reason": reason}]
        run.done += 1
        run.total = max(run.total, run.done + self.pending_total)
        run.current_url = url
        self.save_progress(*([outcome] if outcome != "ingesting" else []), "pages", "done", "total", "current_url")
        logger.info("website %s: %s %s %s", self.website.pk, outcome, url, reason)

    def pending(self, count: int) -> None:
        """``count`` pages are waiting to be handled (the report's total grows to include them)."""
        self.pending_total = count
        if self.report.done + count > self.report.total:
            self.report.total = self.report.done + count
            self.save_progress("total")

    def save_progress(self, *fields: str) -> None:
        """Write ``fields`` of the run; raises ``SyncCancelled`` if the run (or its website) was deleted."""
        run = self.report
        values = {name: getattr(run, name) for name in fields}
        if not WebsiteSync.objects.filter(pk=run.pk).update(**values, updated_at=timezone.now()):
            raise SyncCancelled(f"sync #{run.pk} was deleted while it ran")

    def full(self) -> bool:
        """The page limit is reached. Pages waiting for their batch count as kept, so when they alone
        would reach the limit they are ingested first (one that fails frees its place)."""
        if len(self.kept) >= self.website.page_limit and self.to_ingest:
            self.flush()
        return len(self.kept) >= self.website.page_limit

    # -- modes --

    def run(self) -> None:
        try:
            if self.website.mode == Website.Mode.SITEMAP:
                self.run_sitemap()
            else:
                self.run_crawl()
            self.flush()
        except BaseException as error:
            if self.to_ingest:  # stored but never ingested: say so rather than leave them queued
                services.sources_fail_unfinished(
                    [page.source_id for page in self.to_ingest],
                    f"the website sync stopped before ingesting this page ({type(error).__name__}: {error})")
            raise

    def run_crawl(self) -> None:
        start = crawler.normalize_url(self.website.url)
        queue: deque[tuple[str, int]] = deque([(start, 0)])
        queued = {start}
        while queue:
            self.pending_total = len(queue) - 1
            url, depth = queue.popleft()
            if self.full():
                break
            expand = depth < self.website.max_depth
            visit = self.visit(url, expand=expand, required=(depth == 0),
                               keep=(depth > 0 or crawler.path_allowed(url, self.include, self.exclude)))
            for link in visit.links:
                if link not in queued and crawler.in_site(link, self.site) and crawler.path_allowed(
                        link, self.include, self.exclude):
                    queued.add(link)
                    queue.append((link, depth + 1))
            self.pending(len(queue))
        self.flush()
        # Known pages the crawl did not reach this time: still on the site unless they say otherwise.
        rest = [uri for uri in self.known if uri not in self.kept and uri not in self.requested]
        self.pending(len(rest))
        for uri in rest:
            self.pending_total -= 1
            source = self.known[uri]
            if not crawler.path_allowed(uri, self.include, self.exclude):
                self.remove(source, "excluded by the website's path patterns")
            elif self.full():
                self.remove(source, f"over the website's page limit ({self.website.page_limit})")
            else:
                self.visit(uri, expand=False)
        self.remove_unreached()

    def run_sitemap(self) -> None:
        listed = crawler.sitemap_page_urls(self.fetcher, self.website.url)  # FetchError fails the run
        listed_set = set(listed)
        wanted = []
        for url in listed:
            if not crawler.in_site(url, self.site):
                self.record(url, "skipped", "the sitemap lists a page of another site")
            elif crawler.path_allowed(url, self.include, self.exclude):
                wanted.append(url)
        self.pending(len(wanted))
        for index, url in enumerate(wanted):
            self.pending_total = len(wanted) - index - 1
            if self.full():
                break
            self.visit(url, expand=False)
        self.flush()
        for uri, source in list(self.known.items()):
            if uri in self.kept or uri in self.requested or not Source.objects.filter(pk=source.pk).exists():
                continue
            if uri in listed_set and not crawler.path_allowed(uri, self.include, self.exclude):
                self.remove(source, "excluded by the website's path patterns")
            elif uri in listed_set:
                self.remove(source, f"over the website's page limit ({self.website.page_limit})")
            else:
                self.remove(source, "no longer listed in the sitemap")
        self.remove_unreached()

    def remove_unreached(self) -> None:
        """Pages requested this run whose URL now redirects to (or names as canonical) another page."""
        self.flush()
        for uri, target in self.moved.items():
            source = self.known[uri]
            if uri not in self.kept and Source.objects.filter(pk=source.pk).exists():
                self.remove(source, f"moved to {target}")

    # -- one page --

    def visit(self, url: str, *, expand: bool, required: bool = False, keep: bool = True) -> _Visit:
        """Fetch ``url`` and keep, skip, fail or remove it. ``expand``: its links are wanted (fetch in
        full). ``required``: a fetch failure fails the whole run (the start page). ``keep``: ingest it
        (the start page of a crawl whose patterns exclude it is only read for its links)."""
        self.requested.add(url)
        source = self.known.get(url)
        conditional = source is not None and not expand and source.status == Source.Status.READY and source.chunk_count > 0
        try:
            response = self.fetcher.get(
                url, etag=source.http_etag if conditional else "",
                last_modified=source.http_last_modified if conditional else "",
                accept=lambda content_type: content_type in crawler.PARSER_FILENAMES,
            )
        except crawler.FetchError as error:
            if required:
                raise crawler.FetchError(f"the start page cannot be fetched: {error}") from None
            if isinstance(error, crawler.RobotsDisallowed):
                if source is not None:
                    self.remove(source, "robots.txt disallows it now")
                else:
                    self.record(url, "skipped", str(error))
            else:
                self.record(url, "failed", str(error))
            return _Visit()
        if required and response.status not in (200, 304):
            raise crawler.FetchError(f"the start page cannot be fetched: HTTP {response.status} from {response.url}")
        final = response.url
        if source is None:
            source = self.known.get(final)
        if response.status == 304:
            if source is None:
                self.record(url, "failed", "HTTP 304 to an unconditional request")
                return _Visit()
            self.kept.add(source.uri)
            self.record(source.uri, "unchanged", "not modified (HTTP 304)")
            return _Visit(kept=True)
        if response.status in (404, 410):
            if source is not None:
                self.remove(source, f"HTTP {response.status}")
            else:
                self.record(url, "failed", f"HTTP {response.status} (a broken link?)")
            return _Visit()
        if response.status != 200:
            self.record(url, "failed", f"HTTP {response.status} from {final}; the serving version, if any, is kept"
                        if source else f"HTTP {response.status} from {final}")
            return _Visit()
        if response.content_type not in crawler.PARSER_FILENAMES:
            self.record(url, "skipped", f"not a page the parsers read (content type {response.content_type or 'none'})")
            return _Visit()
        filename = crawler.page_filename(final, response.content_type)
        is_text = filename.endswith((".html", ".txt", ".md"))
        body = _as_utf8(response) if is_text else response.body
        links, canonical = crawler.html_links(body, final) if filename.endswith(".html") else ([], "")
        uri = canonical if canonical and crawler.in_site(canonical, self.site) else final
        visit = _Visit(links=links if expand else [])
        if url in self.known and url != uri:
            self.moved[url] = uri  # removed after the run unless kept under its own URL
        if not keep:
            self.record(uri, "skipped", "start page: its links were followed, the website's path patterns exclude it")
            return visit
        if uri in self.kept:
            self.record(url, "skipped", f"same page as {uri} (canonical URL)")
            return visit
        if not crawler.path_allowed(uri, self.include, self.exclude):
            self.record(uri, "skipped", "excluded by the website's path patterns")
            return visit
        if len(uri) > Source._meta.get_field("uri").max_length:
            self.record(uri, "failed", "the URL is longer than 2000 characters")
            return visit
        digest = hashlib.sha256(body).hexdigest()
        document = _parse_or_none(filename, body)
        text_digest = _sha256(document.text) if document is not None else digest
        same = self.text_hashes.get(text_digest)
        if same and same != uri:
            self.record(uri, "skipped", f"same content as {same}")
            return visit
        visit.kept = self.ingest(uri, body, filename, digest, response, text_digest, document)
        if visit.kept:
            self.text_hashes.setdefault(text_digest, uri)
        return visit

    def ingest(self, uri: str, body: bytes, filename: str, digest: str, response: crawler.Response,
               text_digest: str, document: ParsedDocument | None) -> bool:
        """Keep the page ``uri``: unchanged when its bytes hash to the serving version's, or when its
        title and extracted text are the serving version's (only markup outside the main content
        changed: a menu item, a script, a token), else stored as a pending version, like an upload,
        and queued for the next batch (``flush``). Returns whether it is kept (for now: a queued
        page that then fails to ingest is dropped from ``kept`` by ``flush``)."""
        website = self.website
        existing = Source.objects.filter(collection=website.collection, uri=uri).first()
        if existing is not None and existing.website_id != website.pk:
            self.record(uri, "skipped", "already a source of this collection from elsewhere")
            return False
        validators = {"http_etag": response.etag[:500], "http_last_modified": response.last_modified[:100]}
        serving = (existing is not None and existing.status == Source.Status.READY and existing.chunk_count > 0
                   and not existing.chunks.exclude(embedding_model=embedding_module.model_id()).exists())
        same_text = document is not None and serving and (existing.title, existing.text) == (
            document.title[:500], document.text)
        if serving and (existing.content_hash == digest or same_text):
            Source.objects.filter(pk=existing.pk).update(**validators)
            self.kept.add(uri)
            self.record(uri, "unchanged", "same content" if existing.content_hash == digest else
                        "same text (only the page's markup changed)")
            return True
        with transaction.atomic():
            source = existing or Source.objects.create(
                collection=website.collection, uri=uri, kind=Source.Kind.PAGE, website=website, title=uri[:500]
            )
            source = Source.objects.select_for_update().get(pk=source.pk)
            services.pending_file_store(source, filename, ContentFile(body))
            source.status, source.progress, source.error = Source.Status.QUEUED, 0, ""
            source.save()
        self.kept.add(uri)
        self.known.setdefault(uri, source)
        self.to_ingest.append(_PendingPage(
            uri=uri, source_id=source.pk, was_serving=existing is not None and existing.chunk_count > 0,
            validators=validators, text_digest=text_digest, report_index=len(self.report.pages)))
        self.record(uri, "ingesting")
        if len(self.to_ingest) >= settings.INGEST_TASK_SOURCES:
            self.flush()
        return True

    def flush(self) -> None:
        """Ingest the pages waiting for their batch together (``services.documents_ingest``: their
        chunks embedded in shared rounds, each page swapped in its own transaction and failing alone)
        and give each its outcome in the report, in its place: new or changed, or failed with the
        reason (its serving version, if any, kept; it is no longer kept by this run)."""
        batch, self.to_ingest = self.to_ingest, []
        if not batch:
            return
        try:
            results = services.documents_ingest([page.source_id for page in batch])
        except BaseException:
            self.to_ingest = batch  # ``run`` fails the ones still unfinished
            raise
        for page, result in zip(batch, results, strict=True):
            if result.status == "failed":
                Source.objects.filter(pk=page.source_id).update(http_etag="", http_last_modified="")
                self.kept.discard(page.uri)
                if self.text_hashes.get(page.text_digest) == page.uri:
                    del self.text_hashes[page.text_digest]
                self.resolve(page, "failed", result.error + ("; the serving version is kept" if page.was_serving else ""))
                continue
            Source.objects.filter(pk=page.source_id).update(**page.validators)
            self.resolve(page, "changed" if page.was_serving else "new",
                         "" if result.status == "ingested" else result.status)

    def resolve(self, page: _PendingPage, outcome: str, reason: str) -> None:
        """Replace the report's ``ingesting`` line of ``page`` by its outcome and count it there."""
        run = self.report
        setattr(run, outcome, getattr(run, outcome) + 1)
        pages = list(run.pages)
        pages[page.report_index] = {"url": page.uri, "outcome": outcome, "reason": reason}
        run.pages = pages
        self.save_progress(outcome, "pages")
        logger.info("website %s: %s %s %s", self.website.pk, outcome, page.uri, reason)

    def remove(self, source: Source, reason: str) -> None:
        services.source_delete(source)
        self.record(source.uri, "removed", reason)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _parse_or_none(filename: str, body: bytes) -> ParsedDocument | None:
    """What the parsers extract from ``body``, or ``None`` if they cannot (the ingestion then
    reports why)."""
    try:
        return parse_file(filename, body)
    except ParseError:
        return None


def _as_utf8(response: crawler.Response) -> bytes:
    """A text body in UTF-8: the HTTP charset, when it names another one, is decoded here (an HTML
    page that declares its charset in a <meta> tag is left to the parser)."""
    body, charset = response.body, response.charset
    if not charset or charset in ("utf-8", "utf8"):
        return body
    if response.content_type in ("text/html", "application/xhtml+xml") and b"charset" in body[:4096].lower():
        return body
    try:
        return body.decode(charset).encode("utf-8")
    except (LookupError, UnicodeDecodeError):
        return body  # the parser reports it
