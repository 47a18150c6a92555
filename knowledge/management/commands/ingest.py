"""``manage.py ingest PATH... [--collection NAME]``: queue files and folders for ingestion and show
progress until every source is ready or failed."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from knowledge import services
from knowledge.models import DEFAULT_COLLECTION, Source

_DONE = {Source.Status.READY, Source.Status.FAILED}


class Command(BaseCommand):
    help = "Ingest files and folders (.md .txt .html .pdf .docx, .csv FAQ sheets) into the knowledge base."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", help="files or folders (walked recursively)")
        parser.add_argument("--collection", default=DEFAULT_COLLECTION)
        parser.add_argument("--prune", action="store_true",
                            help="delete sources under the given folders whose files are gone")
        parser.add_argument("--sync", action="store_true",
                            help="ingest in this process instead of queuing Celery tasks")
        parser.add_argument("--force", action="store_true",
                            help="re-parse and re-embed even files whose content is unchanged")
        parser.add_argument("--no-wait", action="store_true", help="queue and return at once")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")

    def handle(self, *args, paths, collection, prune, sync, force, no_wait, timeout, **options):
        try:
            result = services.sources_register_paths(
                paths, collection=collection, prune=prune, enqueue=not sync, force=force
            )
        except FileNotFoundError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"{len(result.queued)} queued, {len(result.unchanged)} unchanged, {result.pruned} pruned "
            f"(collection {collection!r})"
        )
        ids = [source.pk for source in result.queued]
        if sync:
            for source_id in tqdm(ids, desc="ingesting", unit="file"):
                services.document_ingest(source_id, force=force)
        elif ids and not no_wait:
            self._wait(ids, timeout)
        if not no_wait:
            self._summary(ids)

    def _wait(self, ids, timeout):
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        warned = False
        with tqdm(total=len(ids) * 100, desc="ingesting", unit="%", bar_format="{l_bar}{bar}| {postfix}") as bar:
            while True:
                rows = list(Source.objects.filter(pk__in=ids).values_list("status", "progress"))
                done = sum(1 for status, _ in rows if status in _DONE)
                progress = sum(100 if status in _DONE else progress for status, progress in rows)
                bar.n = progress
                bar.set_postfix_str(f"{done}/{len(ids)} files")
                bar.refresh()
                if done == len(rows):
                    return
                if not warned and time.monotonic() - started > 30 and progress == 0:
                    self.stderr.write("nothing has started after 30 s: is a Celery worker running? "
                                      "(python dev.py run starts one; or use --sync)")
                    warned = True
                if time.monotonic() > deadline:
                    raise CommandError(f"timed out after {timeout:g} s; ingestion continues in the worker")
                time.sleep(0.5)

    def _summary(self, ids):
        failed = Source.objects.filter(pk__in=ids, status=Source.Status.FAILED)
        ready = Source.objects.filter(pk__in=ids, status=Source.Status.READY)
        chunks = sum(ready.values_list("chunk_count", flat=True))
        self.stdout.write(self.style.SUCCESS(f"{ready.count()} ready ({chunks} chunks), {failed.count()} failed"))
        for source in failed:
            self.stdout.write(self.style.ERROR(f"  failed: {source.uri}: {source.error}"))
