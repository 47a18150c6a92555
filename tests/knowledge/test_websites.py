"""Website sources against a local HTTP server started by each test (loopback allowed explicitly by
``WEBSITE_ALLOWED_NETWORKS``), the real Postgres + pgvector and the real embedding model: crawl,
sitemap, robots.txt, redirects, errors, huge and non-HTML pages, re-sync with conditional requests,
removal, deduplication, the SSRF guard, the schedule, the admin and the ``ingest`` command.

Syncs run in the test's process through ``websites.website_sync`` (what the Celery task calls); the
Celery path itself is tested in ``test_website_tasks.py``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import markdown_it
import pytest
from django.core.management import call_command
from django.urls import reverse
from django_celery_beat.models import PeriodicTask

from knowledge import crawler, websites
from knowledge.models import Chunk, Source, Website, WebsiteSync
from tests.knowledge.conftest import serving_snapshot
from tests.knowledge.sample_files import CARE_PDF_PAGES, pdf_bytes
from tests.knowledge.website_server import Site, html_page

pytestmark = pytest.mark.django_db

DEMO = Path(__file__).resolve().parents[2] / "demo" / "knowledge_base"


@pytest.fixture(autouse=True)
def website_settings(settings):
    settings.WEBSITE_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.WEBSITE_REQUEST_INTERVAL_S = 0.0
    return settings


@pytest.fixture
def site():
    server = Site().start()
    yield server
    server.stop()


def demo_store(site: Site) -> None:
    """The demo store's help pages as a website: a home page linking the policies (Markdown rendered
    to HTML), the warranty page as it is, and the stores page as plain text."""
    md = markdown_it.MarkdownIt()
    links = ["/help/returns", "/help/shipping", "/help/warranty.html", "/stores.txt"]
    site.page("/", html_page("Example Store help", "<h1>Help centre</h1><p>Answers about orders.</p>", links=links))
    for path, name in (("/help/returns", "returns-policy.md"), ("/help/shipping", "shipping-policy.md")):
        text = (DEMO / name).read_text()
        title = text.splitlines()[0].lstrip("# ")
        site.page(path, html_page(title, md.render(text), links=["/"]))
    site.page("/help/warranty.html", (DEMO / "warranty.html").read_text())
    site.file("/stores.txt", (DEMO / "about-stores.txt").read_bytes(), "text/plain; charset=utf-8")


def sync(url: str, **kwargs) -> WebsiteSync:
    website = websites.website_register(url, **kwargs)
    return websites.website_sync(website.pk)


def outcomes(run: WebsiteSync) -> list[tuple[str, str, str]]:
    """The report's pages as (outcome, path, reason), in the order they were handled."""
    return [(p["outcome"], crawler.path_of(p["url"]) if p["url"].startswith("http") else p["url"], p["reason"])
            for p in run.pages]


def counts(run: WebsiteSync) -> dict:
    return {k: getattr(run, k) for k in ("new", "changed", "unchanged", "removed", "failed", "skipped")}


def pages() -> dict[str, Source]:
    return {crawler.path_of(s.uri): s for s in Source.objects.filter(kind="page")}


# --- crawl ------------------------------------------------------------------------------------------


def test_crawl_ingests_each_page_of_the_site_as_a_source_with_its_url(site):
    # given the demo store served as a small website, with an off-site link and a mailto link
    demo_store(site)
    site.page("/", html_page("Example Store help", "<h1>Help centre</h1><p>Answers about orders.</p>"
                             '<p><a href="https://example.org/elsewhere">partner</a> '
                             '<a href="mailto:help@example.com">mail</a></p>',
                             links=["/help/returns", "/help/shipping", "/help/warranty.html", "/stores.txt"]))
    # when it is synced from its home page
    run = sync(site.url("/"))
    # then every page is a ready source whose uri is its URL, in the report as new; the warranty
    # page's link to the shop (not served) is reported
    assert run.status == "finished" and run.error == ""
    assert counts(run) == {"new": 5, "changed": 0, "unchanged": 0, "removed": 0, "failed": 1, "skipped": 0}
    assert [(o, p) for o, p, _ in outcomes(run)] == [
        ("new", "/"), ("new", "/help/returns"), ("new", "/help/shipping"), ("new", "/help/warranty.html"),
        ("new", "/stores.txt"), ("failed", "/shop"),
    ]
    assert outcomes(run)[-1][2] == "HTTP 404 (a broken link?)"
    found = pages()
    assert sorted(found) == ["/", "/help/returns", "/help/shipping", "/help/warranty.html", "/stores.txt"]
    returns = found["/help/returns"]
    assert (returns.uri, returns.kind, returns.status, returns.error) == (site.url("/help/returns"), "page", "ready", "")
    assert returns.website_id == run.website_id and returns.public_url == site.url("/help/returns")
    assert returns.title == "Returns and refunds"
    # and the text is the page's main content: no site header, navigation or footer
    assert "Example Store header" not in returns.text and "Copyright" not in returns.text
    assert returns.text.startswith("Returns and refunds\n\n")
    assert Chunk.objects.filter(source=returns).count() == returns.chunk_count > 0
    # and nothing off the site was requested; robots.txt was asked first, once
    assert site.paths_requested() == ["/robots.txt", "/", "/help/returns", "/help/shipping", "/help/warranty.html",
                                      "/stores.txt", "/shop"]
    # and every request said who it is
    assert {r.headers["user-agent"] for r in site.requests} == {
        "TidewaterSupportBot/0.1 (knowledge-base sync of a self-hosted support assistant)"}


def test_crawl_follows_links_up_to_the_depth_and_the_path_patterns_and_page_limit(site):
    # given a chain of pages / -> /a -> /b -> /c, and a page under an excluded folder
    site.page("/", html_page("Home", "<p>Home page text here.</p>", links=["/a", "/archive/old"]))
    site.page("/a", html_page("A", "<p>Page A text here.</p>", links=["/b"]))
    site.page("/b", html_page("B", "<p>Page B text here.</p>", links=["/c"]))
    site.page("/c", html_page("C", "<p>Page C text here.</p>"))
    site.page("/archive/old", html_page("Old", "<p>Archived text.</p>"))
    # when it is crawled two links deep without /archive/*
    run = sync(site.url("/"), max_depth=2, exclude=["/archive/*"])
    # then /c (three links away) and the archive were not fetched
    assert sorted(pages()) == ["/", "/a", "/b"]
    assert "/c" not in site.paths_requested() and "/archive/old" not in site.paths_requested()
    assert run.new == 3
    # when the page limit is 2
    Source.objects.all().delete()
    run = sync(site.url("/"), max_depth=2, page_limit=2)
    # then only the first two pages found are kept
    assert sorted(pages()) == ["/", "/a"]
    assert run.new == 2


def test_robots_txt_disallowed_pages_are_never_fetched(site):
    # given a robots.txt that disallows /private/ for every crawler
    site.file("/robots.txt", b"User-agent: *\nDisallow: /private/\n", "text/plain")
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/private/staff", "/public"]))
    site.page("/public", html_page("Public", "<p>Opening hours are nine to five.</p>"))
    site.page("/private/staff", html_page("Staff", "<p>Staff only.</p>"))
    # when the site is crawled
    run = sync(site.url("/"))
    # then the private page was never requested and is reported as skipped with the reason
    assert "/private/staff" not in site.paths_requested()
    assert sorted(pages()) == ["/", "/public"]
    assert ("skipped", "/private/staff", f"robots.txt disallows {site.url('/private/staff')}") in outcomes(run)


def test_a_robots_txt_that_answers_5xx_means_nothing_may_be_fetched(site):
    # given a site whose robots.txt fails with 503 (RFC 9309: assume everything is disallowed)
    site.page("/robots.txt", "<p>maintenance</p>", status=503)
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>"))
    run = sync(site.url("/"))
    assert (run.status, run.error) == ("failed", f"the start page cannot be fetched: robots.txt disallows {site.url('/')}")
    assert site.paths_requested() == ["/robots.txt"]


def test_a_page_in_another_charset_declared_by_http_is_read_as_such(site):
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/menu.txt"]))
    site.file("/menu.txt", "Café menu\n\nCrème brûlée is served daily.\n".encode("iso-8859-1"),
              "text/plain; charset=ISO-8859-1")
    sync(site.url("/"))
    assert pages()["/menu.txt"].text == "Café menu\n\nCrème brûlée is served daily.\n"


def test_redirect_loop_500_huge_and_non_html_pages_are_reported_and_the_rest_is_ingested(site, settings):
    # given a site with a redirect loop, a server error, a page over the size limit, an image, a PDF
    # and a page that redirects within the site
    settings.WEBSITE_MAX_PAGE_BYTES = 4000
    links = ["/loop-a", "/broken", "/huge", "/huge-unannounced", "/logo.png", "/care.pdf", "/old-returns", "/returns"]
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=links))
    site.redirect("/loop-a", "/loop-b")
    site.redirect("/loop-b", "/loop-a")
    site.page("/broken", "<p>Internal error</p>", status=500)
    site.page("/huge", html_page("Huge", "<p>" + "word " * 2000 + "</p>"))
    site.page("/huge-unannounced", html_page("Huge", "<p>" + "word " * 2000 + "</p>"), send_length=False)
    site.file("/logo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image/png")
    site.file("/care.pdf", pdf_bytes(CARE_PDF_PAGES), "application/pdf")
    site.redirect("/old-returns", "/returns")
    site.page("/returns", html_page("Returns", "<p>Return any item within 30 days.</p>"))
    # when it is crawled
    run = sync(site.url("/"))
    # then each problem is in the report with its reason, and the good pages are sources
    loop = " -> ".join(site.url(p) for p in ("/loop-a", "/loop-b", "/loop-a"))
    assert outcomes(run) == [
        ("new", "/", ""),
        ("failed", "/loop-a", f"redirect loop: {loop}"),
        ("failed", "/broken", f"HTTP 500 from {site.url('/broken')}"),
        ("failed", "/huge", f"the page is larger than the {4000 / 1048576:g} MB limit (WEBSITE_MAX_PAGE_BYTES): "
                            f"{site.url('/huge')}"),
        ("failed", "/huge-unannounced", f"the page is larger than the {4000 / 1048576:g} MB limit "
                                        f"(WEBSITE_MAX_PAGE_BYTES): {site.url('/huge-unannounced')}"),
        ("skipped", "/logo.png", "not a page the parsers read (content type image/png)"),
        ("new", "/care.pdf", ""),
        ("new", "/returns", ""),
        ("skipped", "/returns", f"same page as {site.url('/returns')} (canonical URL)"),
    ]
    assert counts(run) == {"new": 3, "changed": 0, "unchanged": 0, "removed": 0, "failed": 4, "skipped": 2}
    assert sorted(pages()) == ["/", "/care.pdf", "/returns"]
    assert pages()["/care.pdf"].title == "Care instructions"
    assert run.status == "finished"


def test_a_page_that_cannot_be_parsed_is_failed_with_the_parsers_reason(site):
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/app"]))
    site.page("/app", "<html><body><div id='root'></div><script>render()</script></body></html>")
    run = sync(site.url("/"))
    assert outcomes(run)[1] == (
        "failed", "/app", "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)")
    assert pages()["/app"].status == "failed" and pages()["/app"].chunk_count == 0


def test_start_page_that_fails_fails_the_run_and_removes_nothing(site):
    # given a synced site
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/a"]))
    site.page("/a", html_page("A", "<p>Page A text here.</p>"))
    first = sync(site.url("/"))
    assert first.new == 2
    before = {path: serving_snapshot(s.pk) for path, s in pages().items()}
    # when its start page answers 500 on the next sync
    site.page("/", "<p>down</p>", status=500)
    run = websites.website_sync(first.website_id)
    # then the run failed with the reason and every page still serves as it was
    assert (run.status, run.error) == ("failed", f"the start page cannot be fetched: HTTP 500 from {site.url('/')}")
    assert {path: serving_snapshot(s.pk) for path, s in pages().items()} == before


# --- sitemaps ---------------------------------------------------------------------------------------


def sitemap(urls: list[str]) -> bytes:
    entries = "".join(f"<url><loc>{u}</loc></url>" for u in urls)
    return f'<?xml version="1.0" encoding="UTF-8"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{entries}</urlset>'.encode()


def test_sitemap_index_pages_are_ingested_and_a_page_dropped_from_it_is_removed(site):
    # given a sitemap index naming one sitemap of three pages (one of another site)
    index = (f'<?xml version="1.0" encoding="UTF-8"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
             f"<sitemap><loc>{site.url('/sitemap-help.xml')}</loc></sitemap></sitemapindex>").encode()
    site.file("/sitemap.xml", index, "application/xml")
    site.file("/sitemap-help.xml", sitemap([site.url("/a"), site.url("/b"), "https://example.org/x"]), "application/xml")
    site.page("/a", html_page("A", "<p>Page A explains refunds.</p>"), etag='"a1"')
    site.page("/b", html_page("B", "<p>Page B explains shipping.</p>"), etag='"b1"')
    # when the sitemap is synced
    run = sync(site.url("/sitemap.xml"))
    # then its pages of this site are sources, the other site's is skipped
    assert Website.objects.get().mode == "sitemap"
    assert outcomes(run) == [
        ("skipped", "/x", "the sitemap lists a page of another site"),
        ("new", "/a", ""), ("new", "/b", ""),
    ]
    assert sorted(pages()) == ["/a", "/b"]
    # when /b is dropped from the sitemap and the site synced again
    site.file("/sitemap-help.xml", sitemap([site.url("/a")]), "application/xml")
    site.requests.clear()
    run = websites.website_sync(run.website_id)
    # then /a is unchanged (asked conditionally: 304, no body) and /b is removed with its chunks
    assert outcomes(run) == [("unchanged", "/a", "not modified (HTTP 304)"),
                             ("removed", "/b", "no longer listed in the sitemap")]
    assert [r.headers.get("if-none-match") for r in site.requests if r.path == "/a"] == ['"a1"']
    assert sorted(pages()) == ["/a"]
    assert not Chunk.objects.filter(source__uri=site.url("/b")).exists()


def test_unreadable_sitemap_fails_the_run_and_removes_nothing(site):
    site.file("/sitemap.xml", sitemap([site.url("/a")]), "application/xml")
    site.page("/a", html_page("A", "<p>Page A explains refunds.</p>"))
    first = sync(site.url("/sitemap.xml"))
    assert first.new == 1
    site.page("/sitemap.xml", "<p>gone</p>", status=404)
    run = websites.website_sync(first.website_id)
    assert run.status == "failed" and run.error.startswith("the sitemap cannot be read")
    assert sorted(pages()) == ["/a"]


# --- re-sync --------------------------------------------------------------------------------------


def test_resync_reingests_changed_pages_removes_gone_ones_and_skips_unchanged(site):
    # given a synced site of four pages with ETags
    links = ["/same", "/dated", "/changes", "/gone", "/flaky"]
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=links))
    site.page("/same", html_page("Same", "<p>Opening hours are nine to five.</p>"), etag='"s1"')
    site.page("/dated", html_page("Dated", "<p>Tents come with a repair kit.</p>"),
              last_modified="Tue, 01 Dec 2026 01:00:00 GMT")
    site.page("/changes", html_page("Changes", "<p>Returns are accepted within 30 days.</p>"), etag='"c1"')
    site.page("/gone", html_page("Gone", "<p>The winter sale ends in March.</p>"), etag='"g1"')
    site.page("/flaky", html_page("Flaky", "<p>Gift cards never expire.</p>"), etag='"f1"')
    first = sync(site.url("/"), max_depth=1)
    assert first.new == 6
    same_before, flaky_before = serving_snapshot(pages()["/same"].pk), serving_snapshot(pages()["/flaky"].pk)
    # when one page changes, one disappears (410), one fails (500), and the site is synced again
    site.page("/changes", html_page("Changes", "<p>Returns are accepted within 60 days.</p>"), etag='"c2"')
    site.page("/gone", "<p>Gone</p>", status=410)
    site.page("/flaky", "<p>oops</p>", status=500)
    site.requests.clear()
    run = websites.website_sync(first.website_id)
    # then the report says so, page by page
    assert outcomes(run) == [
        ("unchanged", "/", "same content"),
        ("unchanged", "/same", "not modified (HTTP 304)"),
        ("unchanged", "/dated", "not modified (HTTP 304)"),
        ("changed", "/changes", ""),
        ("removed", "/gone", "HTTP 410"),
        ("failed", "/flaky", f"HTTP 500 from {site.url('/flaky')}; the serving version, if any, is kept"),
    ]
    assert counts(run) == {"new": 0, "changed": 1, "unchanged": 3, "removed": 1, "failed": 1, "skipped": 0}
    # and the changed page serves its new text, the gone page and its chunks are deleted
    assert "60 days" in pages()["/changes"].text and "30 days" not in pages()["/changes"].text
    assert all("60 days" in c.text for c in Chunk.objects.filter(source=pages()["/changes"]))
    assert "/gone" not in pages()
    # and the unchanged and the failing pages still serve exactly as before
    assert serving_snapshot(pages()["/same"].pk) == same_before
    assert serving_snapshot(pages()["/flaky"].pk) == flaky_before
    # and the leaves were asked conditionally with their ETags or Last-Modified dates
    sent = {r.path: r.headers.get("if-none-match") for r in site.requests}
    assert (sent["/same"], sent["/changes"], sent["/gone"], sent["/flaky"]) == ('"s1"', '"c1"', '"g1"', '"f1"')
    assert [r.headers.get("if-modified-since") for r in site.requests if r.path == "/dated"] == [
        "Tue, 01 Dec 2026 01:00:00 GMT"]
    assert Website.objects.get().last_synced_at is not None


class IngestCalls:
    """Records how a sync ingests its pages: each ``services.documents_ingest`` call's source ids
    (the batched path), and any ``services.document_ingest`` call (one page at a time); both run."""

    def __init__(self, monkeypatch):
        from knowledge import services

        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        real_batch, real_single = services.documents_ingest, services.document_ingest

        def batch(source_ids, **kwargs):
            self.batches.append(list(source_ids))
            return real_batch(source_ids, **kwargs)

        def single(source_id, **kwargs):
            self.singles.append(source_id)
            return real_single(source_id, **kwargs)

        monkeypatch.setattr(services, "documents_ingest", batch)
        monkeypatch.setattr(services, "document_ingest", single)


def test_sync_ingests_its_new_and_changed_pages_in_one_batch_and_a_corrupt_page_fails_alone(site, monkeypatch):
    calls = IngestCalls(monkeypatch)
    # given a small site: the demo store's pages and a PDF
    demo_store(site)
    site.page("/", html_page("Example Store help", "<h1>Help centre</h1><p>Answers about orders.</p>",
                             links=["/help/returns", "/help/shipping", "/help/warranty.html", "/stores.txt",
                                    "/care.pdf"]))
    site.file("/care.pdf", pdf_bytes(CARE_PDF_PAGES), "application/pdf")
    # when it is synced
    first = sync(site.url("/"))
    # then its six pages were ingested together by one documents_ingest call, none alone (the
    # warranty page's link to the shop answers 404)
    assert counts(first) == {"new": 6, "changed": 0, "unchanged": 0, "removed": 0, "failed": 1, "skipped": 0}
    ids = {path: source.pk for path, source in pages().items()}
    assert calls.batches == [[ids[path] for path in ("/", "/help/returns", "/help/shipping", "/help/warranty.html",
                                                      "/stores.txt", "/care.pdf")]]
    assert calls.singles == []
    care_before = serving_snapshot(ids["/care.pdf"])
    shipping_before = serving_snapshot(ids["/help/shipping"])
    # when the returns page changes, the PDF is replaced by a corrupt one and the site is synced again
    returns_html = site.routes["/help/returns"].body.decode().replace("30 days", "45 days")
    assert "45 days" in returns_html
    site.page("/help/returns", returns_html)
    site.file("/care.pdf", pdf_bytes(CARE_PDF_PAGES)[:60], "application/pdf")
    run = websites.website_sync(first.website_id)
    # then the two were ingested in one batch: the changed page serves its new text, the corrupt PDF
    # failed with the parser's reason, in its place in the report, and serves its previous version
    assert calls.batches[1:] == [[ids["/help/returns"], ids["/care.pdf"]]]
    assert calls.singles == []
    reason = "corrupt or unreadable PDF (Stream has ended unexpectedly)"
    assert outcomes(run) == [
        ("unchanged", "/", "same content"), ("changed", "/help/returns", ""),
        ("unchanged", "/help/shipping", "same content"), ("unchanged", "/help/warranty.html", "same content"),
        ("unchanged", "/stores.txt", "same content"), ("failed", "/care.pdf", reason + "; the serving version is kept"),
        ("failed", "/shop", "HTTP 404 (a broken link?)"),
    ]
    assert (run.status, run.done, run.total) == ("finished", 7, 7)
    care = Source.objects.get(pk=ids["/care.pdf"])
    assert (care.status, care.error, care.pending_file.name, care.http_etag) == ("failed", reason, "", "")
    assert serving_snapshot(ids["/care.pdf"]) == care_before
    assert "45 days" in Source.objects.get(pk=ids["/help/returns"]).text
    assert serving_snapshot(ids["/help/shipping"]) == shipping_before


def test_a_page_404_removes_it_and_one_no_longer_linked_is_kept_while_it_exists(site):
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/a", "/b"]))
    site.page("/a", html_page("A", "<p>Page A explains refunds.</p>"))
    site.page("/b", html_page("B", "<p>Page B explains shipping.</p>"))
    first = sync(site.url("/"))
    # when the home page stops linking /b and /a is deleted
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/a"]))
    del site.routes["/a"]
    run = websites.website_sync(first.website_id)
    # then /a is removed (404) and /b, still served, is checked and kept
    assert outcomes(run) == [("unchanged", "/", "same text (only the page's markup changed)"),
                             ("removed", "/a", "HTTP 404"), ("unchanged", "/b", "same content")]
    assert sorted(pages()) == ["/", "/b"]


def test_a_page_whose_markup_changes_but_not_its_text_is_not_reingested(site):
    # given a synced page, then its menu, a script and a token outside the main content change
    site.page("/", html_page("Returns", "<p>Returns are accepted within 30 days.</p>"))
    first = sync(site.url("/"))
    source = Source.objects.get()
    before = serving_snapshot(source.pk)
    site.page("/", html_page("Returns", "<p>Returns are accepted within 30 days.</p>", links=["/new-menu-item"],
                             head="<script>var csrf='f00d';</script>"))
    site.page("/new-menu-item", html_page("New", "<p>New page.</p>"))
    run = websites.website_sync(first.website_id)
    # then the page is unchanged (no re-embedding) and serves exactly as before
    assert outcomes(run)[0] == ("unchanged", "/", "same text (only the page's markup changed)")
    assert serving_snapshot(source.pk) == before
    # and when its title changes, it is re-ingested
    site.page("/", html_page("Returns and refunds", "<p>Returns are accepted within 30 days.</p>"))
    run = websites.website_sync(first.website_id)
    assert outcomes(run)[0] == ("changed", "/", "")
    assert Source.objects.get(pk=source.pk).title == "Returns and refunds"


def test_pages_with_the_same_canonical_url_or_content_are_kept_once(site):
    canonical = f'<link rel="canonical" href="{site.url("/guide")}">'
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>",
                             links=["/guide?utm_source=mail", "/guide", "/copy"]))
    site.page("/guide", html_page("Guide", "<p>Sizing guide for jackets.</p>", head=canonical))
    site.page("/copy", html_page("Guide", "<p>Sizing guide for jackets.</p>", head=canonical.replace("/guide", "/copy")))
    run = sync(site.url("/"))
    assert outcomes(run) == [
        ("new", "/", ""),
        ("new", "/guide", ""),
        ("skipped", "/guide", f"same page as {site.url('/guide')} (canonical URL)"),
        ("skipped", "/copy", f"same content as {site.url('/guide')}"),
    ]
    assert sorted(pages()) == ["/", "/guide"]


# --- the SSRF guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback address 127.0.0.1"),
    ("10.1.2.3", "private address 10.1.2.3"),
    ("192.168.0.10", "private address 192.168.0.10"),
    ("172.16.5.4", "private address 172.16.5.4"),
    ("169.254.169.254", "link-local address 169.254.169.254"),
    ("0.0.0.0", "private address 0.0.0.0"),
    ("::1", "loopback address ::1"),
    ("fe80::1", "link-local address fe80::1"),
    ("fd00::5", "private address fd00::5"),
    ("::ffff:127.0.0.1", "loopback address 127.0.0.1"),
    ("100.64.0.1", "non-public address 100.64.0.1"),
    ("8.8.8.8", ""),
    ("2606:4700:4700::1111", ""),
])
def test_address_guard_refuses_every_non_public_address(address, reason):
    assert crawler.AddressGuard().refusal(address) == reason


def test_address_guard_allows_only_the_configured_networks():
    guard = crawler.AddressGuard.from_settings()  # the tests' setting: 127.0.0.1/32
    assert (guard.refusal("127.0.0.1"), guard.refusal("127.0.0.2")) == ("", "loopback address 127.0.0.2")


def test_a_malformed_allowed_network_is_a_system_check_error(settings):
    from knowledge.checks import website_allowed_networks_valid

    settings.WEBSITE_ALLOWED_NETWORKS = ["10.0.5.0/24", "intranet"]
    assert [(e.id, e.msg) for e in website_allowed_networks_valid()] == [
        ("knowledge.E002", "WEBSITE_ALLOWED_NETWORKS: 'intranet' does not appear to be an IPv4 or IPv6 network")]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a", "gopher://x/", "javascript:alert(1)",
                                 "/relative/path", "http:///no-host"])
def test_non_http_urls_are_refused_before_anything_is_saved(url):
    with pytest.raises(crawler.AddressRefused):
        websites.website_register(url)
    assert not Website.objects.exists()


def test_a_loopback_site_is_refused_when_the_setting_does_not_allow_it(site, settings):
    # given the default setting (no network allowed) and a site on 127.0.0.1
    settings.WEBSITE_ALLOWED_NETWORKS = []
    site.page("/", html_page("Home", "<p>Internal admin panel.</p>"))
    # when it is synced, by address and by a name that resolves to it
    run = sync(site.url("/"))
    by_name = sync(f"http://localhost:{site.port}/")
    # then both runs fail before any connection: the server received nothing
    assert run.status == "failed"
    assert run.error == ("the start page cannot be fetched: 127.0.0.1 resolves to a loopback address 127.0.0.1; "
                         "internal addresses are refused (WEBSITE_ALLOWED_NETWORKS allows chosen networks)")
    assert by_name.status == "failed" and "localhost resolves to a loopback address" in by_name.error
    assert site.requests == [] and not Source.objects.exists()


def test_a_redirect_off_the_site_is_not_followed(site):
    # given a page that redirects to another host
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/jump"]))
    site.redirect("/jump", f"http://127.0.0.2:{site.port}/secret")
    # when the site is crawled
    run = sync(site.url("/"))
    # then the redirect is refused as off the site and nothing else was requested
    assert outcomes(run)[1] == ("failed", "/jump", f"redirects off the site, to http://127.0.0.2:{site.port}/secret")
    assert site.paths_requested() == ["/robots.txt", "/", "/jump"]


def test_a_redirect_within_the_site_to_a_refused_address_fails_at_connection_time(site):
    # given a fetcher whose site spans 127.0.0.1 and 127.0.0.2 while only 127.0.0.1/32 is allowed,
    # and a page on 127.0.0.1 that redirects to 127.0.0.2
    site.redirect("/jump", f"http://127.0.0.2:{site.port}/secret")
    hosts = frozenset({f"127.0.0.1:{site.port}", f"127.0.0.2:{site.port}"})
    # when it is fetched, the redirect is refused by the guard inside the connection
    with crawler.Fetcher(hosts) as fetcher:
        with pytest.raises(crawler.AddressRefused, match="127.0.0.2 resolves to a loopback address 127.0.0.2"):
            fetcher.get(site.url("/jump"), check_robots=False)
    assert site.paths_requested() == ["/jump"]


def test_requests_to_one_host_are_paced_by_the_setting_and_robots_crawl_delay(site, settings):
    # given an interval of 0.5 s and a robots.txt asking for 3 s between requests
    settings.WEBSITE_REQUEST_INTERVAL_S = 0.5
    site.file("/robots.txt", b"User-agent: TidewaterSupportBot\nCrawl-delay: 3\n", "text/plain")
    site.page("/", "<p>a</p>")
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds):
        waits.append(round(seconds, 3))
        now[0] += seconds

    with crawler.Fetcher(crawler.site_hosts(site.url("/")), sleep=sleep, clock=lambda: now[0]) as fetcher:
        fetcher.get(site.url("/"))  # robots.txt (first request: no wait), then the page
        fetcher.get(site.url("/"))
    # then each page request waited for the crawl delay (robots.txt's, above the setting's 0.5 s)
    assert waits == [3.0, 3.0]


# --- schedule, admin, command, citations ----------------------------------------------------------


def test_resync_schedule_follows_the_websites_setting(site):
    website = websites.website_register(site.url("/"), resync_hours=6)
    task = PeriodicTask.objects.get(pk=website.schedule_id)
    assert (task.task, json.loads(task.args), task.interval.every, task.interval.period, task.enabled) == (
        "knowledge.sync_website", [website.pk], 6, "hours", True)
    # when an admin pauses it in Periodic tasks and the website's period changes, the pause stays
    PeriodicTask.objects.filter(pk=task.pk).update(enabled=False)
    website = websites.website_register(site.url("/"), resync_hours=12)
    task = PeriodicTask.objects.get(pk=website.schedule_id)
    assert (task.interval.every, task.enabled) == (12, False)
    # when the period is 0, the task is deleted
    website = websites.website_register(site.url("/"), resync_hours=0)
    assert website.schedule_id is None and not PeriodicTask.objects.filter(pk=task.pk).exists()


def test_admin_adds_a_website_which_queues_its_first_sync(admin_client, site, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse("admin:knowledge_website_add"), {
            "url": site.url("/help/"), "mode": "crawl", "collection": "help", "include_patterns": "/help/*",
            "exclude_patterns": "", "page_limit": 50, "max_depth": 2, "resync_hours": 24,
        })
    assert response.status_code == 302
    website = Website.objects.get()
    assert (website.url, website.collection, website.include_patterns) == (site.url("/help/"), "help", "/help/*")
    assert website.schedule is not None and len(callbacks) == 1
    run = WebsiteSync.objects.get()
    assert (run.website_id, run.status) == (website.pk, "queued")
    # and the queued run's report refreshes itself until it is done
    page = admin_client.get(reverse("admin:knowledge_websitesync_change", args=[run.pk])).content.decode()
    assert '<meta http-equiv="refresh" content="2">' in page


def test_admin_refuses_a_non_http_url_with_a_clear_error(admin_client):
    response = admin_client.post(reverse("admin:knowledge_website_add"), {
        "url": "file:///etc/passwd", "mode": "crawl", "collection": "default", "page_limit": 50, "max_depth": 2,
        "resync_hours": 24,
    })
    assert response.status_code == 200
    assert not Website.objects.exists()
    assert "Enter a valid URL." in response.content.decode() or "only http and https" in response.content.decode()


def test_admin_sync_now_queues_a_run_per_website(admin_client, site, django_capture_on_commit_callbacks):
    website = websites.website_register(site.url("/"))
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse("admin:knowledge_website_changelist"),
                                     {"action": "sync_now", "_selected_action": [website.pk]})
    assert response.status_code == 302 and len(callbacks) == 1
    assert list(WebsiteSync.objects.values_list("website_id", "status")) == [(website.pk, "queued")]


def test_deleting_a_website_deletes_its_pages_reports_and_schedule_and_nothing_else(admin_client, site):
    # given a synced website and an uploaded file in the same collection
    from knowledge import services

    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>"))
    run = sync(site.url("/"))
    upload = services.source_upload(filename="notes.md", data=b"# Notes\n\nKeep receipts.\n")
    services.document_ingest(upload.pk)
    schedule_id = Website.objects.get().schedule_id
    # when the website is deleted in the admin
    response = admin_client.post(reverse("admin:knowledge_website_delete", args=[run.website_id]), {"post": "yes"})
    # then its page, chunks, reports and periodic task are gone; the upload is untouched
    assert response.status_code == 302
    assert (Website.objects.count(), WebsiteSync.objects.count()) == (0, 0)
    assert list(Source.objects.values_list("uri", flat=True)) == ["upload:notes.md"]
    assert not PeriodicTask.objects.filter(pk=schedule_id).exists()
    assert Chunk.objects.exclude(source=upload).count() == 0


def test_admin_report_lists_every_page_with_its_outcome_and_reason(admin_client, site):
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/broken"]))
    site.page("/broken", "<p>x</p>", status=500)
    run = sync(site.url("/"))
    page = admin_client.get(reverse("admin:knowledge_websitesync_change", args=[run.pk])).content.decode()
    assert "1 new, 0 changed, 0 unchanged, 0 removed, 1 failed, 0 skipped" in page
    assert f"<td>failed</td><td>{site.url('/broken')}</td><td>HTTP 500 from {site.url('/broken')}</td>" in page
    assert 'http-equiv="refresh"' not in page
    listing = admin_client.get(reverse("admin:knowledge_website_changelist")).content.decode()
    assert "Finished" in listing and "1 failed" in listing


def test_ingest_command_syncs_a_website_url_and_prints_the_report(site):
    site.page("/", html_page("Home", "<p>Welcome to the help centre.</p>", links=["/a", "/broken"]))
    site.page("/a", html_page("A", "<p>Page A explains refunds.</p>"))
    site.page("/broken", "<p>x</p>", status=500)
    out = io.StringIO()
    call_command("ingest", site.url("/"), "--sync", "--collection", "help", "--depth", "1", "--resync-hours", "0",
                 stdout=out)
    text = out.getvalue()
    assert f"website {site.url('/')} (crawl from a start page, collection 'help')" in text
    assert "finished: 2 new, 0 changed, 0 unchanged, 0 removed, 1 failed, 0 skipped" in text
    assert f"failed: {site.url('/broken')}: HTTP 500 from {site.url('/broken')}" in text
    assert sorted(pages()) == ["/", "/a"] and Source.objects.get(uri=site.url("/a")).collection == "help"
    assert Website.objects.get().schedule is None


def test_cited_passage_of_a_page_carries_its_url_and_a_file_none(site):
    from chat.models import Conversation, Message
    from chat.transcripts import cited_passage_get

    site.page("/", html_page("Home", "<p>Returns are accepted within 30 days of delivery.</p>"))
    sync(site.url("/"))
    chunk = Chunk.objects.get()
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="assistant", text="Yes [1]",
                           citations=[{"n": 1, "chunk_id": chunk.pk}])
    passage = cited_passage_get(conversation, chunk.pk)
    assert passage["url"] == site.url("/") and passage["passage"] == chunk.text


def test_citations_survive_a_resync_that_changes_the_page(site, settings):
    # given a customer's answer citing two passages of a synced page
    from chat.models import Conversation, Message
    from chat.transcripts import CHANGED_NOTICE, cited_passage_get

    settings.WIDGET_PASSAGE_CONTEXT_CHARS = 20
    site.page("/", html_page("Returns", "<h2>Window</h2><p>Returns are accepted within 30 days.</p>"
                                        "<h2>Labels</h2><p>Return labels cost $5.95.</p>"))
    first = sync(site.url("/"))
    window, labels = Chunk.objects.order_by("ordinal")
    conversation = Conversation.objects.create()
    Message.objects.create(conversation=conversation, role="assistant", text="Yes [1][2]", citations=[
        {"n": 1, "chunk_id": window.pk, "source_id": window.source_id, "source_title": "Returns"},
        {"n": 2, "chunk_id": labels.pk, "source_id": labels.source_id, "source_title": "Returns"}])
    # when the page gains a section before them, one passage changes, and the site is synced again
    site.page("/", html_page("Returns", "<h2>Exchanges</h2><p>Exchanges are free.</p>"
                                        "<h2>Window</h2><p>Returns are accepted within 30 days.</p>"
                                        "<h2>Labels</h2><p>Return labels are free.</p>"))
    assert websites.website_sync(first.website_id).changed == 1
    # then the unchanged passage opens where it now is, and the changed one says so with the page's link
    now = cited_passage_get(conversation, window.pk)
    source = Source.objects.get()
    assert (now["status"], now["passage"]) == ("current", "Returns are accepted within 30 days.")
    assert source.text.index(now["passage"]) == Chunk.objects.get(pk=window.pk).start != window.start
    changed = cited_passage_get(conversation, labels.pk)
    assert (changed["status"], changed["notice"], changed["url"], changed["passage"]) == (
        "changed", CHANGED_NOTICE, site.url("/"), "")
    assert changed["after"] == "Exchanges\n\nExchanges are free.\n\nWindow"  # 40 characters at most, at a word


# --- a realistic crawl: Doc2Dial's help pages served as HTML ----------------------------------------


def test_doc2dial_pages_served_as_html_are_crawled_and_answer_their_questions(site, doc2dial_dir, doc2dial_questions):
    # given the first 12 DMV pages of Doc2Dial served as HTML (headings and paragraphs as the text
    # parser reads the .txt files), linked from an index page that the path patterns leave out
    import html

    from knowledge.parsers import parse_file
    from knowledge.selectors import chunk_search

    documents = [json.loads(line) for line in (doc2dial_dir / "documents.jsonl").read_text().splitlines() if line]
    dmv = [d for d in documents if d["domain"] == "dmv"][:12]
    url_of = {}
    for doc in dmv:
        path = f"/dmv/{Path(doc['file']).stem}.html"
        url_of[doc["file"]] = site.url(path)
        parsed = parse_file("page.txt", (doc2dial_dir / doc["file"]).read_bytes())
        body = "".join(
            f"<h{b.level + 1}>{html.escape(parsed.text[b.start:b.end])}</h{b.level + 1}>" if b.kind == "heading"
            else f"<p>{html.escape(parsed.text[b.start:b.end])}</p>" for b in parsed.blocks)
        site.page(path, html_page(html.escape(doc["title"]), body, links=["/"]))
    site.page("/", html_page("DMV help", "<h1>DMV help pages</h1>", links=[f"/dmv/{Path(d['file']).stem}.html" for d in dmv]))
    # when the site is crawled into its own collection
    run = sync(site.url("/"), collection="doc2dial-web", include=["/dmv/*"], max_depth=1)
    # then every page is a ready source titled as the page, whose text is the page's text
    assert counts(run) == {"new": 12, "changed": 0, "unchanged": 0, "removed": 0, "failed": 0, "skipped": 1}
    by_url = {s.uri: s for s in Source.objects.filter(collection="doc2dial-web")}
    assert sorted(by_url) == sorted(url_of.values())
    for doc in dmv:
        source = by_url[url_of[doc["file"]]]
        assert (source.status, source.title) == ("ready", doc["title"])
        expected = parse_file("page.txt", (doc2dial_dir / doc["file"]).read_bytes()).text
        assert " ".join(source.text.split()) == " ".join(expected.split())
    # and the first-turn questions about these pages find their page's URL among the first 5 chunks
    file_of = {url: file for file, url in url_of.items()}
    questions = [q for q in doc2dial_questions if q["is_first_turn"] and q["gold_file"] in url_of]
    hits = sum(
        q["gold_file"] in {file_of[c.source_uri] for c in chunk_search(q["question"], k=5, collection="doc2dial-web")}
        for q in questions
    )
    assert (hits, len(questions)) == (11, 11)
