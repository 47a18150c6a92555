"""``manage.py ensure_admin``: create the first admin login (once) and print it.

The password is generated on first run and kept in ``<DATA_DIR>/admin-login.txt`` (readable by the
machine's owner only) so it can be printed again; change it in the admin for anything but a demo.
A superuser is staff, so this login also opens the agents' dashboard (``chat.access``): the command
lives in the chat app, which owns who may use the product, not in the knowledge base. ``dev.py run``
calls it.
"""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from config.embedded import data_dir


class Command(BaseCommand):
    help = "Create the admin login if there is no superuser yet, and print it."

    def handle(self, *args, **options):
        User = get_user_model()
        login_file = data_dir() / "admin-login.txt"
        if not User.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser("admin", "admin@example.com", password)
            login_file.write_text(f"admin {password}\n")
            login_file.chmod(0o600)
        if login_file.exists():
            username, password = login_file.read_text().split()
            self.stdout.write(self.style.SUCCESS(f"Admin login: {username} / {password}"))
        else:
            self.stdout.write("An admin account exists already (created elsewhere).")
