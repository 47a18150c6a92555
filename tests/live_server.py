"""A real web process for tests: daphne serving the project's ASGI app (``tests.browser.asgi_app``, the
production app without a static-files wrapper) on the test database, in a subprocess.

    with live_server(database, log_path=tmp / "daphne.log") as server:
        server.url   # "http://127.0.0.1:<free port>"
        server.pid   # the daphne process id

A subprocess (not a fork of the test process) keeps torch's and llama.cpp's threads out of a fork; it
reads the same settings (and so the same Redis channel layer) as the test process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    """Start daphne on a free port with ``LIVE_SERVER_DATABASE_NAME=database`` (and the settings in
    ``env``, e.g. ``LLM_SERVER_URL``), wait until ``/``
    answers 200, yield a ``LiveServer``, and stop it afterwards (SIGTERM, then SIGKILL after 30 s).
    Raises ``LiveServerError`` with the server's log when it does not start in ``start_timeout_s``."""
    port = free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tests.browser.asgi_app:application"],
            cwd=ROOT, env={**os.environ, **SERVER_ENVIRONMENT, "LIVE_SERVER_DATABASE_NAME": database, **(env or {})},
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
