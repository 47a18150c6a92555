"""Fetching website pages for the knowledge base: one polite, guarded HTTP client per sync.

No database here: ``knowledge.websites`` decides what to fetch and what to do with it.

- HTTP with httpx2 (the maintained httpx fork already in the lock); environment proxies are ignored,
  so every connection goes where the guard checked.
- Server-side request forgery guard (``AddressGuard``): only ``http``/``https`` URLs; the host is
  resolved and *every* address must be public (``ipaddress``'s ``is_global``) or inside
  ``WEBSITE_ALLOWED_NETWORKS``. The check runs inside the connection itself (a network backend that
  connects to the address it checked), so a redirect, or a DNS answer that changes between a check and
  the connection (DNS rebinding), cannot reach another address.
- Redirects are followed by hand, at most ``WEBSITE_MAX_REDIRECTS``, only within the site (same host,
  or the host with / without ``www.``; http -> https allowed); a URL seen twice is a loop.
- robots.txt (``urllib.robotparser``) per host, with RFC 9309's rules for an unreachable file: 4xx
  means no rules, 5xx or a network error means nothing may be fetched. A ``Crawl-delay`` above
  ``WEBSITE_REQUEST_INTERVAL_S`` (capped at ``WEBSITE_MAX_CRAWL_DELAY_S``) sets the host's pace.
- Sitemaps with ultimate-sitemap-parser (``usp``), through this client, so they are guarded too.
- Bodies are read as a stream and cut off past ``WEBSITE_MAX_PAGE_BYTES`` (after decompression).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import threading
import time
import urllib.robotparser
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpcore2
import httpx2
from bs4 import BeautifulSoup
from django.conf import settings

# Content types the parsers read, and the file name that routes the bytes to the right parser.
PARSER_FILENAMES = {
    "text/html": "page.html",
    "application/xhtml+xml": "page.html",
    "text/plain": "page.txt",
    "text/markdown": "page.md",
    "text/x-markdown": "page.md",
    "application/pdf": "page.pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "page.docx",
}


class FetchError(Exception):
    """A URL could not or may not be fetched; ``str(error)`` is the reason shown in the sync report."""


class AddressRefused(FetchError):
    """The URL's scheme is not http(s), or its host resolves to a non-public address that
    ``WEBSITE_ALLOWED_NETWORKS`` does not allow (server-side request forgery guard)."""


class RedirectRefused(FetchError):
    """A redirect loop, too many redirects, or a redirect off the site."""


class RobotsDisallowed(FetchError):
    """robots.txt does not let this client fetch the URL."""


class PageTooLarge(FetchError):
    """The body is larger than ``WEBSITE_MAX_PAGE_BYTES``."""


# --- URLs -------------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """``url`` in the form pages are identified by: scheme and host lower-cased, default port and
    fragment dropped, an empty path as ``/``. Raises ``AddressRefused`` for a scheme other than
    http(s) or a URL without a host."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise AddressRefused(f"only http and https URLs can be fetched, not {parts.scheme or 'a relative URL'}: {url}")
    if not parts.hostname:
        raise AddressRefused(f"the URL has no host: {url}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise AddressRefused(f"the URL has an invalid port: {url}") from None
    if port and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", parts.query, ""))


def site_hosts(url: str) -> frozenset[str]:
    """The hosts (with port, as in ``normalize_url``) that count as the site of ``url``: its own and
    the same with or without a leading ``www.``."""
    netloc = urlsplit(normalize_url(url)).netloc
    other = netloc[4:] if netloc.startswith("www.") else f"www.{netloc}"
    return frozenset({netloc, other})


def in_site(url: str, hosts: frozenset[str]) -> bool:
    """Whether the (normalized) ``url`` is on one of ``hosts``."""
    return urlsplit(url).netloc in hosts


def path_of(url: str) -> str:
    """The path with its query (``/help/a?x=1``), what include/exclude patterns are matched against."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def patterns_from_text(text: str) -> list[str]:
    """Non-empty lines of ``text``, stripped (one glob per line, as the admin form takes them)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def path_allowed(url: str, include: list[str], exclude: list[str]) -> bool:
    """Whether ``url``'s path (with query) matches one of ``include`` (any when empty) and none of
    ``exclude``; globs as in ``fnmatch.fnmatchcase``."""
    path = path_of(url)
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in exclude):
        return False
    return not include or any(fnmatch.fnmatchcase(path, pattern) for pattern in include)


# --- the address guard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressGuard:
    """Decides which IP addresses may be connected to: public ones, and those in ``allowed_networks``."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls) -> "AddressGuard":
        """The guard of ``WEBSITE_ALLOWED_NETWORKS``; raises ``ValueError`` for a malformed network."""
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in settings.WEBSITE_ALLOWED_NETWORKS if n.strip()))

    def refusal(self, address: str) -> str:
        """Why ``address`` (an IP address string) may not be connected to, or ``""`` if it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.allowed_networks):
            return ""
        if ip.is_global and not ip.is_multicast:
            return ""
        kind = ("loopback" if ip.is_loopback else "link-local" if ip.is_link_local
                else "private" if ip.is_private else "non-public")
        return f"{kind} address {ip}"

    def resolve(self, host: str, port: int) -> str:
        """Resolve ``host`` and return the first of its addresses, after checking every one.

        Raises ``AddressRefused`` if any address is refused (a name that also resolves to an
        internal address is refused whole), ``FetchError`` if the name does not resolve.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise FetchError(f"cannot resolve {host} ({error.strerror or error})") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            reason = self.refusal(address)
            if reason:
                raise AddressRefused(
                    f"{host} resolves to a {reason}; internal addresses are refused "
                    "(WEBSITE_ALLOWED_NETWORKS allows chosen networks)"
                )
        return addresses[0]


class _GuardedBackend(httpcore2.SyncBackend):
    """httpcore2's socket backend, connecting only to an address the guard accepted: the check and
    the connection use the same DNS answer."""

    def __init__(self, guard: AddressGuard):
        self.guard = guard

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = self.guard.resolve(host, port)
        return super().connect_tcp(address, port, timeout, local_address, socket_options)


class _GuardedTransport(httpx2.HTTPTransport):
    """httpx2's transport over a connection pool with ``_GuardedBackend`` (TLS still verifies the
    URL's host name: httpcore2 passes it to the handshake separately from the address)."""

    def __init__(self, guard: AddressGuard):
        super().__init__(trust_env=False)
        # HTTPTransport has no network_backend argument; its pool is rebuilt with one (httpcore2's
        # public ConnectionPool API). tests/knowledge/test_crawler.py proves the guard is in the path.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False), network_backend=_GuardedBackend(guard)
        )


# --- fetching ---------------------------------------------------------------------------------------


@dataclass
class Response:
    """A fetched URL: ``url`` is where the redirects (listed in ``redirects``) ended, ``status`` the
    final HTTP status, ``body`` the (decompressed) bytes, empty for 304 and for bodies not read."""

    requested_url: str
    url: str
    status: int
    content_type: str = ""
    charset: str = ""
    etag: str = ""
    last_modified: str = ""
    body: bytes = b""
    redirects: list[str] = field(default_factory=list)


class Fetcher:
    """A guarded, polite HTTP client for one website sync (not shared between threads' syncs).

    ``site`` is the set of hosts redirects may go to (``site_hosts``). Every request sends
    ``WEBSITE_USER_AGENT`` and waits for its host's pace. ``sleep`` / ``clock`` are injectable for tests
    of the pacing. Use as a context manager, or call ``close()``.
    """

    def __init__(self, site: frozenset[str], *, guard: AddressGuard | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.site = site
        self.guard = guard or AddressGuard.from_settings()
        self.user_agent = settings.WEBSITE_USER_AGENT
        self.robots_token = self.user_agent.split("/", 1)[0].split()[0]
        self._sleep, self._clock = sleep, clock
        self._last_request: dict[str, float] = {}
        self._interval: dict[str, float] = {}
        self._robots: dict[str, urllib.robotparser.RobotFileParser | None] = {}
        self._lock = threading.Lock()
        self.client = httpx2.Client(
            transport=_GuardedTransport(self.guard),
            headers={"User-Agent": self.user_agent},
            timeout=httpx2.Timeout(settings.WEBSITE_TIMEOUT_S),
            follow_redirects=False,
            trust_env=False,
        )

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    # -- pacing and robots.txt --

    def _wait_turn(self, host: str) -> None:
        with self._lock:
            interval = self._interval.get(host, settings.WEBSITE_REQUEST_INTERVAL_S)
            last = self._last_request.get(host)
            if last is not None:
                wait = last + interval - self._clock()
                if wait > 0:
                    self._sleep(wait)
            self._last_request[host] = self._clock()

    def robots(self, url: str) -> urllib.robotparser.RobotFileParser | None:
        """The parsed robots.txt of ``url``'s host (fetched once per sync), or ``None`` when the site
        has none (any 4xx): everything is allowed then. A 5xx, a refused redirect or a network error
        gives a parser that disallows everything (RFC 9309, section 2.3.1.4)."""
        parts = urlsplit(url)
        host = parts.netloc
        if host not in self._robots:
            robots_url = f"{parts.scheme}://{host}/robots.txt"
            parser = urllib.robotparser.RobotFileParser(robots_url)
            try:
                response = self.get(robots_url, check_robots=False)
            except (AddressRefused, RobotsDisallowed):
                raise
            except PageTooLarge:
                response = None  # an oversized robots.txt: RFC 9309 lets crawlers use what they read; we read none
                parser.allow_all = True
            except FetchError:
                response = None
                parser.disallow_all = True
            if response is not None:
                if response.status == 200:
                    parser.parse(response.body.decode("utf-8", "replace").splitlines())
                elif 400 <= response.status < 500:
                    parser = None
                else:
                    parser.disallow_all = True
            if parser is not None:
                delay = parser.crawl_delay(self.robots_token)
                if delay:
                    self._interval[host] = max(
                        settings.WEBSITE_REQUEST_INTERVAL_S, min(float(delay), settings.WEBSITE_MAX_CRAWL_DELAY_S)
                    )
            self._robots[host] = parser
        return self._robots[host]

    def allowed_by_robots(self, url: str) -> bool:
        """Whether robots.txt lets this client's User-Agent fetch ``url``."""
        parser = self.robots(url)
        return parser is None or parser.can_fetch(self.robots_token, url)

    # -- requests --

    def get(self, url: str, *, etag: str = "", last_modified: str = "", check_robots: bool = True,
            accept: Callable[[str], bool] | None = None) -> Response:
        """GET ``url``, following redirects within the site.

        ``etag`` / ``last_modified`` make the request conditional (a 304 comes back with no body).
        ``accept(content_type)`` decides whether a 200's body is read at all (for types no parser
        reads, the connection is closed unread). Raises ``AddressRefused``, ``RedirectRefused``,
        ``PageTooLarge``, ``RobotsDisallowed`` or ``FetchError`` (timeout, connection error).
        Non-2xx statuses are returned, not raised.
        """
        current = normalize_url(url)
        seen = [current]
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        while True:
            if check_robots and not self.allowed_by_robots(current):
                raise RobotsDisallowed(f"robots.txt disallows {current}")
            self._wait_turn(urlsplit(current).netloc)
            try:
                with self.client.stream("GET", current, headers=headers) as response:
                    location = response.headers.get("location") if response.is_redirect else None
                    if location is None:
                        return self._read(url, current, response, seen[1:], accept)
            except httpx2.TimeoutException:
                raise FetchError(f"timed out after {settings.WEBSITE_TIMEOUT_S:g} s: {current}") from None
            except httpx2.HTTPError as error:
                raise FetchError(f"cannot fetch {current} ({type(error).__name__}: {error})") from None
            target = normalize_url(urljoin(current, location))
            if target in seen:
                raise RedirectRefused("redirect loop: " + " -> ".join([*seen, target]))
            if len(seen) > settings.WEBSITE_MAX_REDIRECTS:
                raise RedirectRefused(f"more than {settings.WEBSITE_MAX_REDIRECTS} redirects from {url}")
            if not in_site(target, self.site):
                raise RedirectRefused(f"redirects off the site, to {target}")
            seen.append(target)
            current = target

    def _read(self, requested: str, url: str, response: httpx2.Response, redirects: list[str],
              accept: Callable[[str], bool] | None) -> Response:
        content_type, _, params = response.headers.get("content-type", "").partition(";")
        content_type = content_type.strip().lower()
        charset = ""
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                charset = value.strip().strip('"').lower()
        result = Response(
            requested_url=normalize_url(requested), url=url, status=response.status_code,
            content_type=content_type, charset=charset, etag=response.headers.get("etag", ""),
            last_modified=response.headers.get("last-modified", ""), redirects=redirects,
        )
        if response.status_code != 200 or (accept is not None and not accept(content_type)):
            return result
        limit = settings.WEBSITE_MAX_PAGE_BYTES
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PageTooLarge(_too_large(url, limit))
        body = bytearray()
        try:
            for piece in response.iter_bytes():
                body += piece
                if len(body) > limit:
                    raise PageTooLarge(_too_large(url, limit))
        except httpx2.HTTPError as error:
            raise FetchError(f"the connection broke while reading {url} ({type(error).__name__})") from None
        result.body = bytes(body)
        return result


def _too_large(url: str, limit: int) -> str:
    return f"the page is larger than the {limit / (1024 * 1024):g} MB limit (WEBSITE_MAX_PAGE_BYTES): {url}"


def page_filename(url: str, content_type: str) -> str:
    """The file name a page's bytes are ingested under: the URL's last path segment (its stem is
    the title of a page without one) with the extension of ``content_type``'s parser."""
    extension = PARSER_FILENAMES[content_type].rsplit(".", 1)[1]
    segment = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", segment.rsplit(".", 1)[0]).strip("_")[:80] or "index"
    return f"{stem}.{extension}"


# --- HTML: links and canonical URL -------------------------------------------------------------------


def html_links(body: bytes, base_url: str) -> tuple[list[str], str]:
    """The http(s) links of an HTML page (normalized, in page order, each once; ``rel=nofollow``
    links skipped) and its canonical URL (``<link rel="canonical">``, normalized; ``""`` if absent or
    not http(s)). Relative links resolve against ``<base href>`` when present."""
    soup = BeautifulSoup(body, "html.parser")
    base_tag = soup.find("base", href=True)
    base = urljoin(base_url, base_tag["href"]) if base_tag else base_url
    links: list[str] = []
    for anchor in soup.find_all("a", href=True):
        if "nofollow" in (anchor.get("rel") or []):
            continue
        try:
            links.append(normalize_url(urljoin(base, anchor["href"])))
        except (AddressRefused, ValueError):
            continue  # mailto:, javascript:, tel:, malformed
    canonical = ""
    for tag in soup.find_all("link", href=True):
        if "canonical" in [r.lower() for r in (tag.get("rel") or [])]:
            try:
                canonical = normalize_url(urljoin(base, tag["href"]))
            except (AddressRefused, ValueError):
                canonical = ""
            break
    return list(dict.fromkeys(links)), canonical


# --- sitemaps -----------------------------------------------------------------------------------------


def sitemap_page_urls(fetcher: Fetcher, sitemap_url: str) -> list[str]:
    """The page URLs listed by the sitemap at ``sitemap_url`` (nested sitemap indexes followed, gzip
    and plain-text sitemaps read by ultimate-sitemap-parser), fetched through ``fetcher``, normalized,
    in order, each once. Raises ``FetchError`` with usp's reason if the top sitemap cannot be read."""
    from usp.fetch_parse import SitemapFetcher
    from usp.objects.sitemap import InvalidSitemap

    client = _usp_client_class()(fetcher)
    tree = SitemapFetcher(url=normalize_url(sitemap_url), recursion_level=0, web_client=client).sitemap()
    if isinstance(tree, InvalidSitemap):
        raise FetchError(f"the sitemap cannot be read: {tree.reason}")
    urls = []
    for page in tree.all_pages():
        try:
            urls.append(normalize_url(page.url))
        except AddressRefused:
            continue
    return list(dict.fromkeys(urls))


def _usp_client_class():
    """ultimate-sitemap-parser's web-client interface, implemented over a ``Fetcher`` (imported
    lazily: only sitemap syncs need usp)."""
    from usp.web_client.abstract_client import (
        AbstractWebClient,
        AbstractWebClientSuccessResponse,
        WebClientErrorResponse,
    )

    class Success(AbstractWebClientSuccessResponse):
        def __init__(self, response: Response):
            self._response = response

        def status_code(self) -> int:
            return self._response.status

        def status_message(self) -> str:
            return "OK"

        def header(self, case_insensitive_name: str) -> str | None:
            return {"content-type": self._response.content_type}.get(case_insensitive_name.lower())

        def raw_data(self) -> bytes:
            return self._response.body

        def url(self) -> str:
            return self._response.url

    class Client(AbstractWebClient):
        def __init__(self, fetcher: Fetcher):
            self.fetcher = fetcher

        def set_max_response_data_length(self, max_response_data_length: int | None) -> None:
            pass  # WEBSITE_MAX_PAGE_BYTES applies

        def get(self, url: str):
            try:
                response = self.fetcher.get(url)
            except FetchError as error:
                return WebClientErrorResponse(str(error), retryable=False)
            if response.status != 200:
                return WebClientErrorResponse(f"HTTP {response.status} for {response.url}", retryable=False)
            return Success(response)

    return Client
