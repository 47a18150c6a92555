"""``manage.py ensure_admin`` (chat app): the first admin login, created once and printed each time."""

from __future__ import annotations

import io
import stat

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_ensure_admin_creates_one_superuser_once_and_prints_its_login(tmp_path, monkeypatch):
    # given an empty data folder and no superuser
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    # when the command runs twice
    first, second = io.StringIO(), io.StringIO()
    call_command("ensure_admin", stdout=first)
    call_command("ensure_admin", stdout=second)
    # then one superuser "admin" exists, its login file is the owner's only, and both runs print it
    admin = User.objects.get(is_superuser=True)
    password = (tmp_path / "admin-login.txt").read_text().split()[1]
    assert (admin.username, admin.check_password(password)) == ("admin", True)
    assert stat.S_IMODE((tmp_path / "admin-login.txt").stat().st_mode) == 0o600
    assert first.getvalue() == second.getvalue() == f"Admin login: admin / {password}\n"
