"""Static files middleware: whitenoise, plus the headers of the widget script that other sites embed.

``StaticFilesMiddleware`` is whitenoise's ``WhiteNoiseMiddleware`` (files served by the web process
itself, compressed, with content-hashed names in production; see ``STORAGES`` in ``config.settings``)
with two additions for files under ``<STATIC_URL>widget/``:

- cache lifetime: under its hashed name (what ``{% static %}`` links, e.g. ``widget.3f2a9c1e.js``) the
  script is immutable and cached for ten years, as every hashed file; under its plain name
  (``/static/widget/widget.js``, the URL pasted into the embedding sites' pages, README "Chat
  widget") it is cached for ``WIDGET_SCRIPT_MAX_AGE_S`` seconds, so a new release reaches those sites
  within that time;
- CORS: a request whose ``Origin`` may use the widget (``chat.origins.origin_allowed``:
  ``WIDGET_ALLOWED_ORIGINS`` plus the site's own hosts) gets ``Access-Control-Allow-Origin: <origin>``;
  other origins get none (whitenoise's ``*`` for every file is turned off by
  ``WHITENOISE_ALLOW_ALL_ORIGINS = False``). Responses vary on ``Origin``.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_vary_headers
from whitenoise.middleware import WhiteNoiseMiddleware

from chat.origins import origin_allowed

WIDGET_FOLDER = "widget/"


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """``WhiteNoiseMiddleware`` with the widget script's cache lifetime and CORS headers (see the
    module docstring). Place it right after ``SecurityMiddleware``, as whitenoise asks."""

    def add_files(self, root, prefix=None) -> None:
        """Whitenoise's, except that with finders on (development, tests) a ``STATIC_ROOT`` that
        collectstatic never filled is skipped silently instead of warning "No directory at"."""
        if self.use_finders and root == self.static_root and not os.path.isdir(root):
            return
        super().add_files(root, prefix)

    def _is_widget(self, url: str) -> bool:
        return url.startswith(self.static_prefix + WIDGET_FOLDER)

    def add_cache_headers(self, headers, path: str, url: str) -> None:
        """Whitenoise's ``Cache-Control`` (ten years for hashed names, ``WHITENOISE_MAX_AGE``
        otherwise), except ``WIDGET_SCRIPT_MAX_AGE_S`` for the widget's plain names. Called once per
        file when whitenoise indexes it (at start-up, or per request with autorefresh)."""
        super().add_cache_headers(headers, path, url)
        if self._is_widget(url) and not self.immutable_file_test(path, url):
            headers["Cache-Control"] = f"max-age={settings.WIDGET_SCRIPT_MAX_AGE_S}, public"

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = super().__call__(request)
        if self._is_widget(request.path_info):
            origin = request.headers.get("Origin")
            if origin and origin_allowed(origin):
                response["Access-Control-Allow-Origin"] = origin
            patch_vary_headers(response, ["Origin"])
        return response
