"""``manage.py flag_stale_corrections [--source ID ...]``: flag corrections whose sources changed since
they were written (``tuning.services.corrections_flag_stale``). Run after ingestion (or on a schedule)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tuning.services import corrections_flag_stale


class Command(BaseCommand):
    help = "Flag corrections whose knowledge-base sources changed after they were written."

    def add_arguments(self, parser):
        parser.add_argument("--source", type=int, action="append", dest="source_ids",
                            help="Only corrections citing this source id (repeatable).")

    def handle(self, *args, source_ids=None, **options):
        count = corrections_flag_stale(source_ids=source_ids)
        self.stdout.write(f"flagged {count} correction(s) as stale")
