"""A real web process for tests: daphne serving the project's ASGI app (``tests.browser.asgi_app``, the
production app without a static-files wrapper) on the test database, in a subprocess.

    with live_server(database, log_path=tmp / "daphne.log") as server:
        server.url   # "http://127.0.0.1:<free port>"
        server.pid   # the daphne process id

A subprocess (not a fork of the test process) keeps torch's and llama.cpp's threads out of a fork; it
reads the same settings (and so the same Redis channel layer) as the test process.

Static files are served as in production: ``manage.py collectstatic`` writes them once per test
process (``collected_static_root``) into a temporary ``STATIC_ROOT`` with whitenoise's
``CompressedManifestStaticFilesStorage`` (compressed, content-hashed names, a manifest), and the
server runs with ``WHITENOISE_USE_FINDERS`` off, so pages link the hashed names and only collected
files are served: an asset missing from the manifest makes its page fail to render (500), one
missing from ``STATIC_ROOT`` is a 404.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
# The production settings module with DEBUG off, in development mode only for its servers (the test
# run's embedded PostgreSQL and Redis, development SECRET_KEY, plain HTTP on loopback).
SERVER_ENVIRONMENT = {"DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "false", "EMBEDDED_SERVICES": "1"}


_static_root: Path | None = None


def static_environment(static_root: Path) -> dict:
    """The settings of a process serving (or collecting) the production way from ``static_root``."""
    return {"STATIC_ROOT": str(static_root), "WHITENOISE_USE_FINDERS": "false"}


def collected_static_root() -> Path:
    """A temporary ``STATIC_ROOT`` filled by ``manage.py collectstatic`` with the production storage
    (``static_environment``): run on the first call (~10 s), the same folder returned afterwards in
    this process, removed when it exits. Raises ``subprocess.CalledProcessError`` (its output in
    ``stdout``/``stderr``) when collectstatic fails, e.g. for a file a stylesheet refers to that does
    not exist."""
    global _static_root
    if _static_root is None:
        folder = Path(tempfile.mkdtemp(prefix="static-"))
        atexit.register(shutil.rmtree, folder, True)
        subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT,
                       env={**os.environ, **SERVER_ENVIRONMENT, **static_environment(folder)},
                       check=True, capture_output=True, text=True, timeout=600)
        _static_root = folder
    return _static_root


@dataclass(frozen=True)
class LiveServer:
    """A running daphne: its base ``url`` and process id ``pid``."""

    url: str
    pid: int


class LiveServerError(RuntimeError):
    """The server did not answer within the start timeout (the message holds its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(database: str, *, log_path: Path, start_timeout_s: float = 90,
                env: dict | None = None) -> Iterator[LiveServer]:
    """Start daphne on a free port with ``LIVE_SERVER_DATABASE_NAME=database``, the collected static
    files (``collected_static_root``) and the settings in ``env`` (e.g. ``LLM_SERVER_URL``), wait until
    ``/`` answers 200, yield a ``LiveServer``, and stop it afterwards (SIGTERM, then SIGKILL after 30 s).
    Raises ``LiveServerError`` with the server's log when it does not start in ``start_timeout_s``, or
    with collectstatic's output when that fails."""
    try:
        static_root = collected_static_root()
    except subprocess.CalledProcessError as error:
        raise LiveServerError(f"collectstatic failed:\n{error.stdout}{error.stderr}") from None
    port = free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tests.browser.asgi_app:application"],
            cwd=ROOT, env={**os.environ, **SERVER_ENVIRONMENT, **static_environment(static_root),
                           "LIVE_SERVER_DATABASE_NAME": database, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise LiveServerError(f"the live server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.3)
        yield LiveServer(url=url, pid=server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
