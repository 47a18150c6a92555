"""``manage.py reembed``: rebuild embeddings after the embedding model (or its dimension) changed."""

from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from knowledge import services
from knowledge.embedding import model_id


class Command(BaseCommand):
    help = "Re-embed chunks written by another embedding model than the configured one."

    def add_arguments(self, parser):
        parser.add_argument("--collection", default=None)
        parser.add_argument("--all", action="store_true", dest="everything", help="re-embed every chunk")

    def handle(self, *args, collection, everything, **options):
        bar = tqdm(desc=f"re-embedding with {model_id()}", unit="source")

        def report(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        result = services.reembed(collection=collection, everything=everything, report=report)
        bar.close()
        self.stdout.write(self.style.SUCCESS(f"{result.sources} sources, {result.chunks} chunks re-embedded"))
