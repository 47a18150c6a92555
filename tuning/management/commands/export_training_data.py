"""``manage.py export_training_data [--output FILE]``: approved, non-stale corrections as JSONL chat
records (``tuning.services.training_data_export``); standard output without ``--output``."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from tuning.services import training_data_export


class Command(BaseCommand):
    help = "Write approved, non-stale corrections as JSONL chat records (the serving prompt with its sources, then the corrected answer)."

    def add_arguments(self, parser):
        parser.add_argument("--output", "-o", help="File to write (default: standard output).")

    def handle(self, *args, output=None, **options):
        if output:
            with open(output, "w", encoding="utf-8") as handle:
                count = training_data_export(handle)
        else:
            count = training_data_export(sys.stdout)
        self.stderr.write(f"exported {count} training example(s)")
