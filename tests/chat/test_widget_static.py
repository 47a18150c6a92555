"""Static files through the project's real ASGI app (``config.asgi.application``, whitenoise in its
middleware; no static-files test wrapper), with ``DEBUG`` off as in production."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.test import override_settings

from config.asgi import application

ROOT = Path(__file__).resolve().parents[2]
WIDGET_JS = (ROOT / "static" / "widget" / "widget.js").read_bytes()


async def asgi_get(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """One HTTP ``GET`` through the ASGI app, read to the end (Channels' ``HttpCommunicator`` assumes a
    ``body`` key on every body message, which Django's last empty one lacks)."""
    communicator = ApplicationCommunicator(application, {
        "type": "http", "http_version": "1.1", "method": "GET", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "scheme": "http", "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    })
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(30)
    body = b""
    while True:
        message = await communicator.receive_output(30)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(30)
    return {"status": start["status"], "body": body,
            "headers": {name.decode().lower(): value.decode() for name, value in start["headers"]}}


def get(path: str, headers: list[tuple[bytes, bytes]] = ()) -> dict:
    """``GET path`` through the ASGI app: ``{"status", "body", "headers"}`` (header names lower-case)."""
    return asyncio.run(asgi_get(path, list(headers)))


def test_widget_script_is_served_by_the_asgi_app_with_debug_off():
    # given the test settings: DEBUG off, files found in the project folders (no collectstatic)
    assert settings.DEBUG is False
    # when the widget script is requested through the ASGI app
    response = get("/static/widget/widget.js")
    # then it is served, byte for byte, with the widget's cache lifetime and no CORS for a plain request
    assert response["status"] == 200
    assert response["body"] == WIDGET_JS
    assert response["headers"]["content-type"] == "text/javascript; charset=\"utf-8\""
    assert response["headers"]["cache-control"] == f"max-age={settings.WIDGET_SCRIPT_MAX_AGE_S}, public"
    assert "access-control-allow-origin" not in response["headers"]
    assert response["headers"]["vary"] == "Origin"


@override_settings(WIDGET_ALLOWED_ORIGINS=["https://shop.example.com"])
def test_widget_script_allows_only_the_widget_origins():
    # given one embedding site allowed
    # when that site and another one request the widget script
    allowed = get("/static/widget/widget.js", [(b"origin", b"https://shop.example.com")])
    other = get("/static/widget/widget.js", [(b"origin", b"https://evil.example.net")])
    # then the allowed site gets CORS for its origin, the other none (the file itself is public)
    assert allowed["status"] == other["status"] == 200
    assert allowed["headers"]["access-control-allow-origin"] == "https://shop.example.com"
    assert "access-control-allow-origin" not in other["headers"]
    assert allowed["headers"]["vary"] == other["headers"]["vary"] == "Origin"


@override_settings(WIDGET_ALLOWED_ORIGINS=["https://shop.example.com"])
def test_other_static_files_get_whitenoise_defaults_without_cors():
    # given the dashboard's stylesheet (not part of the widget)
    # when an allowed widget origin requests it
    response = get("/static/dashboard/dashboard.css", [(b"origin", b"https://shop.example.com")])
    # then it is served with whitenoise's short lifetime for plain names and no CORS header
    assert response["status"] == 200
    assert response["headers"]["cache-control"] == "max-age=60, public"
    assert "access-control-allow-origin" not in response["headers"]


def test_a_missing_static_file_is_a_404():
    # given no such file; when it is requested; then 404 (not an empty 200)
    response = get("/static/widget/missing.js")
    assert response["status"] == 404


PRODUCTION_STATIC_PROBE = """
import asyncio, json
import django
django.setup()
from django.contrib.staticfiles.storage import staticfiles_storage
from config.asgi import application

from tests.chat.test_widget_static import asgi_get

async def get(path, headers=()):
    r = await asgi_get(path, list(headers))
    h = r["headers"]
    return {"status": r["status"], "length": len(r["body"]), "cache": h.get("cache-control"),
            "encoding": h.get("content-encoding")}

async def main():
    hashed = staticfiles_storage.url("widget/widget.js")
    print(json.dumps({"hashed_url": hashed, "hashed": await get(hashed),
                      "hashed_gzip": await get(hashed, [(b"accept-encoding", b"gzip")]),
                      "plain": await get("/static/widget/widget.js"),
                      "admin_css": await get(staticfiles_storage.url("admin/css/base.css"))}))

asyncio.run(main())
"""


def test_production_serves_collected_hashed_compressed_files(tmp_path):
    # given collectstatic's output (manifest storage: hashed names, gzip) and finders off, as in production
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "false",
           "WHITENOISE_USE_FINDERS": "false", "STATIC_ROOT": str(tmp_path / "static")}
    collect = subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert collect.returncode == 0, collect.stderr
    # when a fresh process serves the widget script through the ASGI app
    probe = subprocess.run([sys.executable, "-c", PRODUCTION_STATIC_PROBE], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    # then templates link a content-hashed name, cached for ten years and served gzipped on request
    assert result["hashed_url"].startswith("/static/widget/widget.") and result["hashed_url"].endswith(".js")
    assert result["hashed_url"] != "/static/widget/widget.js"
    assert result["hashed"] == {"status": 200, "length": len(WIDGET_JS),
                                "cache": "max-age=315360000, public, immutable", "encoding": None}
    assert result["hashed_gzip"]["status"] == 200 and result["hashed_gzip"]["encoding"] == "gzip"
    assert result["hashed_gzip"]["length"] < len(WIDGET_JS)
    # and the plain name the embedding sites use still answers, with the widget's shorter lifetime
    assert result["plain"] == {"status": 200, "length": len(WIDGET_JS),
                               "cache": f"max-age={settings.WIDGET_SCRIPT_MAX_AGE_S}, public", "encoding": None}
    # and the admin's assets are served the same way
    assert result["admin_css"]["status"] == 200 and result["admin_css"]["cache"] == "max-age=315360000, public, immutable"
