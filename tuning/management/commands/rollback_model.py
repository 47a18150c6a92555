"""``manage.py rollback_model VERSION`` serves an earlier model version again (id or name;
``tuning.fine_tuning.model_version_rollback``); ``--list`` shows the registered versions."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from chat.engine import EngineError
from chat.models import ModelVersion
from tuning.fine_tuning import model_version_rollback
from tuning.management.commands.evaluate_model import version_lookup


class Command(BaseCommand):
    help = "Serve an earlier model version again (every web process switches on its next answer)."

    def add_arguments(self, parser):
        parser.add_argument("version", nargs="?", help="model version id or name")
        parser.add_argument("--list", action="store_true", help="list the registered versions")

    def handle(self, *args, version, list, **options):
        if list or not version:
            for v in ModelVersion.objects.order_by("id"):
                self.stdout.write(f"{v.pk:>4}  {'*' if v.is_active else ' '} {v.name}  {v.adapter_path or '(no adapter)'}"
                                  + (f"  REFUSED: {v.refused_reason}" if v.refused_reason else ""))
            if not version:
                return
        try:
            active = model_version_rollback(version_lookup(version).pk)
        except (FileNotFoundError, EngineError) as error:
            raise CommandError(str(error)) from None
        self.stdout.write(f"now serving {active.name}")
