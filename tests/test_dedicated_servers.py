"""``tests.dedicated_servers``: servers of a test's own leave nothing of the run's behind."""

from __future__ import annotations

from tests.dedicated_servers import dedicated_postgres


def test_migrating_a_dedicated_database_starts_no_embedded_redis(tmp_path, monkeypatch):
    # given a data folder of its own (where the settings would start an embedded Redis)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    # when a dedicated PostgreSQL server is started and its database migrated in a subprocess
    with dedicated_postgres("dedicated_no_redis") as postgres:
        migrated = postgres.psql("SELECT count(*) > 0 FROM django_migrations")
    # then the database was migrated, and no Redis was started for it (none left running either)
    assert migrated == [(True,)]
    assert not (tmp_path / "data" / "redis").exists()
