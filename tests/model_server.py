"""A real model server for tests: ``manage.py serve_model`` on a free loopback port, in a subprocess,
reading the model registry of the test database.

    with model_server(database, log_path=tmp / "model.log", env={"MODEL_SERVER_SLOTS": "2"}) as server:
        server.url   # "http://127.0.0.1:<port>/v1"
        server.pid

A subprocess (not a fork of the test process) keeps llama.cpp's threads out of a fork.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.live_server import LiveServerError, free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelServer:
    """A running model server: its API base ``url`` (``.../v1``), ``health_url`` and process id."""

    url: str
    health_url: str
    pid: int

    def health(self) -> dict:
        """``GET /health`` as a dict."""
        with urllib.request.urlopen(self.health_url, timeout=10) as response:
            return json.load(response)


def _database_environment(database: str) -> dict:
    if "://" in database:
        return {"DATABASE_URL": database}
    url = os.environ.get("DATABASE_URL")
    if url:  # same server, the test database
        return {"DATABASE_URL": url.rsplit("/", 1)[0] + "/" + database}
    return {"DATABASE_NAME": database}


@contextmanager
def model_server(database: str, *, log_path: Path, env: dict | None = None,
                 start_timeout_s: float = 120, preload: bool = False) -> Iterator[ModelServer]:
    """Start ``manage.py serve_model --no-preload`` (with ``preload``: without it, as
    ``Procfile.production`` does) on a free port against ``database`` (extra settings in ``env``;
    ``database`` may also be a ``DATABASE_URL``), wait until ``/health`` answers, yield a ``ModelServer``, stop it after
    (SIGTERM, then SIGKILL after 30 s). Raises ``LiveServerError`` with its log when it does not start."""
    port = free_port()
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "false",
                   "EMBEDDED_SERVICES": "1", **_database_environment(database), **(env or {})}
    environment.pop("LLM_SERVER_URL", None)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "manage.py", "serve_model", "--port", str(port), *([] if preload else ["--no-preload"])],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    running = ModelServer(url=base + "/v1", health_url=base + "/health", pid=server.pid)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                running.health()
                break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise LiveServerError(f"the model server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.3)
        yield running
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
