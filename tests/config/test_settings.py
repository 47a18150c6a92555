"""Production settings fail closed, and ``manage.py check --deploy`` is clean with the README's
production environment.

Each case runs ``manage.py`` in a subprocess with ``DJANGO_SETTINGS_MODULE=config.settings`` and an
environment built here: the test process's own ``EMBEDDED_SERVICES`` / ``DEBUG`` are removed, so the
subprocess is in production mode.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_VARIABLES = ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS")
# Everything that could put the subprocess in development mode or change what it checks.
DEVELOPMENT_VARIABLES = ("EMBEDDED_SERVICES", "DEBUG", *PRODUCTION_VARIABLES, "CSRF_TRUSTED_ORIGINS",
                         "SECURE_PROXY_SSL_HEADER", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE",
                         "CSRF_COOKIE_SECURE", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
                         "SECURE_HSTS_PRELOAD")


def database_url() -> str:
    """The test run's database as a ``DATABASE_URL``. The embedded server's host is a socket folder,
    which django-environ reads from the path: ``postgres://user:password@:port//socket/folder/name``."""
    db = connection.settings_dict
    credentials = f"{db['USER']}:{quote(db['PASSWORD'] or '', safe='')}"
    if db["HOST"].startswith("/"):
        return f"postgres://{credentials}@:{db['PORT']}/{db['HOST']}/{db['NAME']}"
    return f"postgres://{credentials}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def production_environment() -> dict[str, str]:
    """The README's "Production deployment" environment, pointed at this test run's servers."""
    return {
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "ALLOWED_HOSTS": "support.example.com",
        "CSRF_TRUSTED_ORIGINS": "https://support.example.com",
        "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
        "SECURE_HSTS_SECONDS": "31536000",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
        "SECURE_HSTS_PRELOAD": "true",
    }


def manage(*args: str, environment: dict[str, str], data_dir: Path) -> subprocess.CompletedProcess:
    """Run ``manage.py args`` in production mode with ``environment`` added to a cleaned copy of
    this process's environment; ``DATA_DIR`` is ``data_dir`` (where embedded servers would start)."""
    base = {key: value for key, value in os.environ.items() if key not in DEVELOPMENT_VARIABLES}
    env = {**base, **environment, "DJANGO_SETTINGS_MODULE": "config.settings", "DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_check_deploy_reports_no_warnings_with_the_documented_production_environment(tmp_path):
    # given the README's production environment, DEBUG unset
    environment = production_environment()
    # when Django's deployment checks run, failing on any warning
    result = manage("check", "--deploy", "--fail-level", "WARNING", environment=environment, data_dir=tmp_path)
    # then they find nothing, and no embedded server was started in the data folder
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "System check identified no issues (0 silenced)."
    assert not (tmp_path / "postgres").exists() and not (tmp_path / "redis").exists()


def test_check_deploy_warns_without_the_https_settings(tmp_path):
    # given the production environment without HSTS (the one opt-in transport setting)
    environment = production_environment()
    del environment["SECURE_HSTS_SECONDS"], environment["SECURE_HSTS_INCLUDE_SUBDOMAINS"], environment["SECURE_HSTS_PRELOAD"]
    # when the deployment checks run
    result = manage("check", "--deploy", "--fail-level", "WARNING", environment=environment, data_dir=tmp_path)
    # then exactly the HSTS warning is reported (so the clean run above is not a check that never fails)
    assert result.returncode == 1
    assert "(security.W004)" in result.stderr
    assert "System check identified 1 issue (0 silenced)." in result.stderr


@pytest.mark.parametrize("missing", PRODUCTION_VARIABLES)
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_start_up_stops_with_a_clear_message_when_a_production_variable_is_missing(missing, how, tmp_path):
    # given the production environment without one required variable (unset or set to "")
    environment = production_environment()
    if how == "unset":
        del environment[missing]
    else:
        environment[missing] = ""
    # when any manage.py command starts
    result = manage("check", environment=environment, data_dir=tmp_path)
    # then it stops with ImproperlyConfigured naming that variable
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"django.core.exceptions.ImproperlyConfigured: {missing} is not set. "), result.stderr
    # and no embedded PostgreSQL or Redis was started instead
    assert not (tmp_path / "postgres").exists() and not (tmp_path / "redis").exists()


def test_development_mode_falls_back_to_the_embedded_servers_explicitly():
    # given EMBEDDED_SERVICES=1 (what dev.py run/test set) and no SECRET_KEY, ALLOWED_HOSTS or REDIS_URL
    # (DATABASE_URL is the test database, so no development database is created)
    from config.embedded import data_dir

    # when settings are loaded
    result = manage("shell", "--verbosity", "0", "-c", "from django.conf import settings; print(settings.REDIS_URL, settings.DEBUG)",
                    environment={"EMBEDDED_SERVICES": "1", "DATABASE_URL": database_url()}, data_dir=data_dir())
    # then the embedded Redis of the data folder is used, with DEBUG still off
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"unix://{data_dir() / 'redis' / 'redis.sock'}", "False"]
