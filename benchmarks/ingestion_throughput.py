"""Ingestion throughput of the knowledge base on real help pages, beside the bare embedding model.

What it measures
    1. The product's ingestion path on the Doc2Dial help pages (273 ``.txt`` files), into a fresh,
       dedicated collection, in this process, as ``manage.py ingest --sync`` and the worker's
       ``knowledge.ingest_sources`` run it: ``services.sources_register_paths(..., enqueue=False)``
       then one ``services.documents_ingest(all source ids)`` (read + hash, parse, chunk each file
       until a round holds ``INGEST_BATCH_CHUNKS`` chunks; embed the round's chunk texts together,
       length-sorted into batches of ``EMBEDDING_BATCH_SIZE``; store each file in its own transaction:
       chunk rows + HNSW and GIN index entries + full-text vectors). ``--path single`` measures the
       one-source path instead (``services.document_ingest`` per file, what ``ingest_source`` runs),
       for comparison. Figures: chunks/s and files/s over the wall-clock time, and the time per
       stage (stage timers wrap the functions the services call; nothing in the product is changed).
    2. Baseline, in the same run: the bare embedding model (``get_embedding_model().encode``, batch
       ``EMBEDDING_BATCH_SIZE``) on exactly the chunk texts the pipeline embedded (title + headings +
       passage, as ``passage_text`` builds them), in the same groups: one call per round of the batch
       path (sentence-transformers sorts a call's texts by length, as the batch path does), or per
       slice of ``--slice`` files of the single path. The cores are shared with other users, so the
       two are interleaved: each group's bare encode runs right after the pipeline embedded and
       stored it, and its time is not counted in the pipeline's wall-clock time. Figure: chunks/s.
    The ratio pipeline/bare says how much of the embedding model's throughput survives the whole
    pipeline (1.0 = ingestion is as fast as embedding alone).

Units: seconds (s), chunks per second (chunks/s), files per second (files/s), milliseconds (ms).
The model is loaded and warmed up before timing; its load time is printed separately.
The collection is deleted at the end (and before the run, if a previous run left it).

How to run (from the project root, with the venv active; use a database of its own):
    DATABASE_NAME=bench python manage.py migrate           # once
    DATABASE_NAME=bench python benchmarks/ingestion_throughput.py [--docs PATH] [--limit N]
        [--path batch|single] [--batch-chunks N] [--torch-threads N]

``--docs`` defaults to ``../shared/data/doc2dial/docs`` (relative to the project root); ``--limit``
ingests only the first N files (a quick run). ``--batch-chunks`` overrides ``INGEST_BATCH_CHUNKS``
for this run. ``--torch-threads`` sets torch's intra-op threads (default: ``EMBEDDING_THREADS``, as
the product runs). Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

from environment import DEFAULT_DOCS, django_setup, docs_folder, header, load_average, progress, torch_threads


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=DEFAULT_DOCS, help=f"Doc2Dial docs folder (default {DEFAULT_DOCS})")
    parser.add_argument("--collection", default="benchmark-ingestion",
                        help="dedicated collection, deleted before and after (default benchmark-ingestion)")
    parser.add_argument("--limit", type=int, default=0, help="ingest only the first N files (0 = all)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads for the embedding model (default: EMBEDDING_THREADS, as the product)")
    parser.add_argument("--path", choices=["batch", "single"], default="batch",
                        help="batch: documents_ingest over all files (default); single: document_ingest per file")
    parser.add_argument("--batch-chunks", type=int, default=0,
                        help="INGEST_BATCH_CHUNKS for this run (default: the setting)")
    parser.add_argument("--slice", type=int, default=25,
                        help="--path single: files per slice, each followed by the bare encode of its texts (default 25)")
    return parser.parse_args()


class StageTimer:
    """Accumulates wall-clock seconds per stage name; ``wrap`` times every call of a function."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - started
                self.calls[stage] += 1

        return timed


@contextmanager
def instrumented(ingestion, model, timer: StageTimer, embedded_texts: list[str], after_round):
    """Time the stages the ingestion services run, record the texts they embed, and call
    ``after_round()`` after each round of ``documents_ingest`` (embedded and stored), by wrapping the
    module-level functions they call in ``ingestion`` (``knowledge.services.ingestion``, where they are
    looked up; restored on exit)."""
    originals = {
        name: getattr(ingestion, name)
        for name in ("parse_file", "chunk_document", "_embed_with_progress", "_swap_chunks", "_read_bytes",
                     "_ingest_round")
    }
    original_encode = model.encode
    embed_with_progress = timer.wrap("embed (encode + progress updates)", originals["_embed_with_progress"])

    def recording_embed(model_arg, texts, report):
        embedded_texts.extend(texts)
        return embed_with_progress(model_arg, texts, report)

    def round_then_hook(*args, **kwargs):
        result = originals["_ingest_round"](*args, **kwargs)
        after_round()
        return result

    ingestion.parse_file = timer.wrap("parse", originals["parse_file"])
    ingestion.chunk_document = timer.wrap("chunk (incl. token counting)", originals["chunk_document"])
    ingestion._embed_with_progress = recording_embed
    ingestion._swap_chunks = timer.wrap("store (delete old, insert chunks + indexes, tsvector)", originals["_swap_chunks"])
    ingestion._read_bytes = timer.wrap("read file", originals["_read_bytes"])
    ingestion._ingest_round = round_then_hook
    model.encode = timer.wrap("model.encode", original_encode)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(ingestion, name, function)
        del model.encode  # back to the class's method


def main() -> None:
    args = parse_args()
    docs = docs_folder(args.docs)
    django_setup()

    from django.conf import settings
    from django.db import connection

    from knowledge import embedding as embedding_module
    from knowledge import services
    from knowledge.services import ingestion
    from knowledge.models import Chunk, Source

    files = services.iter_files([docs])
    files = [f for f in files if f.suffix.lower() in {".txt", ".md", ".html", ".pdf", ".docx", ".csv"}]
    if args.limit:
        files = files[: args.limit]
    total_bytes = sum(f.stat().st_size for f in files)

    stale = Source.objects.filter(collection=args.collection)
    if stale.exists():
        progress(f"deleting {stale.count()} sources left in collection {args.collection!r} by an earlier run")
        stale.delete()

    torch_threads(args.torch_threads)
    if args.batch_chunks:
        settings.INGEST_BATCH_CHUNKS = args.batch_chunks
    progress("loading the embedding model")
    started = time.perf_counter()
    model = embedding_module.get_embedding_model()
    load_s = time.perf_counter() - started
    model.encode(["warm-up sentence for the embedding model"] * 8)  # first call allocates buffers

    path_label = (f"services.documents_ingest (rounds of >= {settings.INGEST_BATCH_CHUNKS} chunks)"
                  if args.path == "batch" else "services.document_ingest per file")
    print(header(f"Ingestion throughput: {path_label} vs bare embedding-model encode", [
        ("data", f"{docs} : {len(files)} files, {total_bytes / 1e6:.2f} MB"),
        ("collection", f"{args.collection!r} (fresh; deleted at the end)"),
        ("model load", f"{load_s:.1f} s (not counted below; warm-up encode done)"),
    ]), flush=True)

    timer = StageTimer()
    embedded_texts: list[str] = []
    results = []
    bare_encode = model.encode  # the class's method, taken before the stage timers wrap it
    bare = {"s": 0.0, "calls": 0, "encoded": 0}
    ingest_started = 0.0

    def bare_encode_new_texts() -> None:
        """Encode the texts embedded since the last call with the bare model, in one call."""
        texts = embedded_texts[bare["encoded"]:]
        if not texts:
            return
        started = time.perf_counter()
        vectors = bare_encode(texts)
        bare["s"] += time.perf_counter() - started
        bare["calls"] += 1
        bare["encoded"] = len(embedded_texts)
        if vectors.shape != (len(texts), settings.EMBEDDING_DIM):
            raise SystemExit(f"error: bare encode returned {vectors.shape}")
        elapsed = time.perf_counter() - ingest_started - bare["s"]
        progress(f"{len(embedded_texts)} chunks embedded: pipeline {elapsed:.0f} s "
                 f"({len(embedded_texts) / elapsed:.1f} chunks/s), bare encode {bare['s']:.0f} s "
                 f"({len(embedded_texts) / bare['s']:.1f} chunks/s)")

    try:
        with instrumented(ingestion, model, timer, embedded_texts, bare_encode_new_texts):
            progress(f"registering {len(files)} files in collection {args.collection!r}")
            started = time.perf_counter()
            registered = services.sources_register_paths(files, collection=args.collection, enqueue=False)
            register_s = time.perf_counter() - started
            ids = [source.pk for source in registered.queued]
            ingest_started = time.perf_counter()
            if args.path == "batch":
                # The bare encode of each round runs inside this call, right after the round.
                results = services.documents_ingest(ids)
            else:
                for offset in range(0, len(ids), args.slice):
                    for source_id in ids[offset: offset + args.slice]:
                        results.append(services.document_ingest(source_id))
                    bare_encode_new_texts()
            ingest_s = time.perf_counter() - ingest_started - bare["s"]
            bare_s = bare["s"]

        failed = [r for r in results if r.status != "ingested"]
        chunks = sum(r.chunk_count for r in results)
        stored = Chunk.objects.filter(source__collection=args.collection).count()
        if stored != chunks or len(embedded_texts) != chunks:
            raise SystemExit(f"error: {chunks} chunks reported, {stored} stored, {len(embedded_texts)} embedded")
        tokens = sum(model.count_tokens(text) for text in embedded_texts)
    finally:
        progress(f"cleaning up collection {args.collection!r}")
        Source.objects.filter(collection=args.collection).delete()

    pipeline_s = register_s + ingest_s
    pipeline_rate = chunks / pipeline_s
    bare_rate = chunks / bare_s
    encode_s = timer.seconds["model.encode"]
    print()
    print(f"files ingested: {len(results) - len(failed)} of {len(files)} ({len(failed)} failed"
          + (": " + "; ".join(f"{r.source_id}: {r.error}" for r in failed[:3]) if failed else "") + ")")
    print(f"chunks: {chunks} ({chunks / max(len(results), 1):.1f} per file), "
          f"{tokens} word-piece tokens embedded ({tokens / chunks:.0f} per chunk, title + headings + passage)")
    print()
    print(f"| throughput | pipeline (register + {'documents_ingest' if args.path == 'batch' else 'document_ingest'}) "
          "| bare model.encode, same texts | ratio pipeline/bare |")
    print("|---|---:|---:|---:|")
    print(f"| wall time (s) | {pipeline_s:.1f} | {bare_s:.1f} | {pipeline_s / bare_s:.2f}x the time |")
    print(f"| chunks/s | {pipeline_rate:.1f} | {bare_rate:.1f} | {pipeline_rate / bare_rate:.2f} |")
    print(f"| files/s | {len(results) / pipeline_s:.2f} | {len(results) / bare_s:.2f} | {pipeline_rate / bare_rate:.2f} |")
    print(f"| tokens/s (embedded) | {tokens / pipeline_s:.0f} | {tokens / bare_s:.0f} | {pipeline_rate / bare_rate:.2f} |")
    print()
    print("Time per stage (pipeline; stages are nested calls of the ingestion service, wall-clock):")
    print("| stage | s | % of pipeline | ms per file | calls |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("register (hash files, create source rows)", register_s, 1),
        ("read file", timer.seconds["read file"], timer.calls["read file"]),
        ("parse", timer.seconds["parse"], timer.calls["parse"]),
        ("chunk (incl. token counting)", timer.seconds["chunk (incl. token counting)"],
         timer.calls["chunk (incl. token counting)"]),
        ("embed (encode + progress updates)", timer.seconds["embed (encode + progress updates)"],
         timer.calls["embed (encode + progress updates)"]),
        ("  of which model.encode", encode_s, timer.calls["model.encode"]),
        ("store (delete old, insert chunks + HNSW/GIN, tsvector)",
         timer.seconds["store (delete old, insert chunks + indexes, tsvector)"],
         timer.calls["store (delete old, insert chunks + indexes, tsvector)"]),
    ]
    accounted = register_s + sum(
        timer.seconds[name] for name in ("read file", "parse", "chunk (incl. token counting)",
                                         "embed (encode + progress updates)",
                                         "store (delete old, insert chunks + indexes, tsvector)")
    )
    rows.append(("other (hash check, status updates, commit, ORM)", pipeline_s - accounted, len(results)))
    for label, seconds, calls in rows:
        print(f"| {label} | {seconds:.2f} | {100 * seconds / pipeline_s:.1f} | "
              f"{1000 * seconds / max(len(results), 1):.1f} | {calls} |")
    print()
    grouping = (f"one call per round of >= {settings.INGEST_BATCH_CHUNKS} chunks" if args.path == "batch"
                else f"one call per slice of {args.slice} files")
    print(f"model.encode inside the pipeline ({timer.calls['model.encode']} calls of <= {settings.EMBEDDING_BATCH_SIZE} "
          f"texts{', length-sorted across the files of a round' if args.path == 'batch' else ' of one file'}): "
          f"{chunks / encode_s:.1f} chunks/s; bare ({bare['calls']} calls, {grouping}, sorted by length inside "
          f"sentence-transformers): {bare_rate:.1f} chunks/s; ratio {chunks / encode_s / bare_rate:.2f}")
    print(f"load average at the end: {load_average()} (1/5/15 min; pipeline and bare encode were interleaved "
          f"round by round so both saw the same load)")
    print(f"database: {connection.settings_dict['NAME']!r}; collection {args.collection!r} deleted")


if __name__ == "__main__":
    main()
