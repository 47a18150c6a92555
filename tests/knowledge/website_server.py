"""A small website served on 127.0.0.1 by a thread of the test (``http.server``), for website-source
tests: routes that a test can change between syncs, and a log of every request it received."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Route:
    """What one path answers: ``status``, ``body``, ``content_type`` and extra ``headers``; with
    ``etag`` (``last_modified``), a request whose If-None-Match (If-Modified-Since) names it gets a
    304; without ``send_length`` the body ends when the connection closes; ``before()`` runs before the answer
    (a test holds a page back with it)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    etag: str = ""
    last_modified: str = ""
    send_length: bool = True
    before: Callable[[], None] | None = None


@dataclass(frozen=True)
class Request:
    """A request the site received: ``path`` with its query, and its headers (lower-cased names)."""

    path: str
    headers: dict[str, str]


class Site:
    """The website: ``routes`` by path (with query, else without), ``requests`` in arrival order."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                site.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = site.routes.get(self.path) or site.routes.get(urlsplit(self.path).path)
                if route is None:
                    route = Route(status=404, body=b"<html><body><p>Not found</p></body></html>")
                if route.before is not None:
                    route.before()
                if (route.etag and self.headers.get("If-None-Match") == route.etag) or (
                        route.last_modified and self.headers.get("If-Modified-Since") == route.last_modified):
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                if route.etag:
                    self.send_header("ETag", route.etag)
                if route.last_modified:
                    self.send_header("Last-Modified", route.last_modified)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="test-website", daemon=True)

    def start(self) -> "Site":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this site."""
        return f"http://127.0.0.1:{self.port}{path}"

    def page(self, path: str, html: str, **kwargs) -> None:
        """Serve ``html`` (UTF-8) at ``path`` (``kwargs``: ``Route``'s fields)."""
        self.routes[path] = Route(body=html.encode(), **kwargs)

    def file(self, path: str, body: bytes, content_type: str, **kwargs) -> None:
        """Serve ``body`` as ``content_type`` at ``path``."""
        self.routes[path] = Route(body=body, content_type=content_type, **kwargs)

    def redirect(self, path: str, location: str, status: int = 301) -> None:
        """Answer ``path`` with a redirect to ``location``."""
        self.routes[path] = Route(status=status, headers={"Location": location}, body=b"")

    def paths_requested(self) -> list[str]:
        """The paths requested so far, in order (robots.txt included)."""
        return [r.path for r in self.requests]


def html_page(title: str, body: str, *, links: list[str] = (), head: str = "") -> str:
    """A page with a site header and navigation (which the parser leaves out), ``body`` inside
    ``<main>``, and links to ``links`` in the navigation."""
    nav = "".join(f'<a href="{href}">{href}</a> ' for href in links)
    return (f"<!doctype html><html><head><title>{title}</title>{head}</head><body>"
            f"<header><p>Example Store header</p><nav>{nav}</nav></header>"
            f"<main>{body}</main><footer>Copyright Example Store</footer></body></html>")
