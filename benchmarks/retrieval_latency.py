"""Retrieval latency (p50/p95) and HNSW recall@10 at the Doc2Dial size and at 100k chunks.

What it measures, at two corpus sizes
    A. the Doc2Dial help pages (273 files; ~1.8k chunks at CHUNK_MAX_TOKENS=256), ingested into a dedicated collection
       through the real path (``services.sources_register_paths(enqueue=False)`` +
       ``services.document_ingest``);
    B. the same collection grown to ``--size`` chunks (default 100,000) with synthetic chunks made
       from real Doc2Dial text (see "How the corpus is grown" below), then ``VACUUM ANALYZE``.
    For ``--questions`` real Doc2Dial questions (default 200, spread evenly over
    ``questions_dev.jsonl``; retrieval text = ``selectors.retrieval_query(question, history)`` as the
    product builds it), it times, interleaved per question:
    - ``chunk_search(query, k=10, collection=..., query_embedding=...)`` in each mode: ``hybrid``
      (the product's retrieval), ``vector`` and ``text`` (one leg each); the query embedding is
      computed beforehand and its own latency (one encode call, with torch's default threads and
      with 1 thread) is reported on separate lines;
    - the vector leg as a bare top-10 SQL statement forced onto the HNSW index
      (``SET LOCAL enable_seqscan = off``, ``enable_sort = off``; the planner prefers a sequential
      scan on small tables) at several ``hnsw.ef_search`` values (``HNSW_EF_SEARCH`` among them);
    - baseline: the exact scan, i.e. the same SQL inside a transaction with
      ``SET LOCAL enable_indexscan = off`` (the plan is checked: no HNSW index, a sequential scan).
    recall@10 of each HNSW result = share of the exact top-10 it returns (a returned chunk also
    counts when its distance ties the exact 10th distance within 1e-6, as in ann-benchmarks).

Units: milliseconds (ms) of wall-clock time per call, measured in this process with
``time.perf_counter`` (so they include the Django/psycopg round trip over the Unix socket);
recall@10 in 0..1; ratios are this/exact of the p50 latencies.

How the corpus is grown (and why not every synthetic chunk is embedded with the model)
    Every real Doc2Dial chunk is cut in two at the sentence end nearest its middle, and each half
    is embedded with the real model (title and headings in front, as ``passage_text`` does). A
    synthetic chunk is two halves from different chunks of the same domain (dmv, ssa, studentaid,
    va), joined by a blank line, under the first one's title and headings: real text, about as long
    as a real chunk. Only pairs whose joined passage fits the model's 256-token window, where each
    half has at least a quarter of the tokens, are used, each unordered pair once. Embedding ~98k
    synthetic texts with all-MiniLM-L6-v2 on 2 shared CPU cores takes hours (the script measures
    the rate on a sample and prints the projection), so a synthetic chunk's vector is computed from
    the real embeddings of its two halves: their token-count-weighted mean, re-normalised.
    all-MiniLM-L6-v2 mean-pools token vectors, so the embedding of a concatenation is close to that
    weighted mean (not equal: attention mixes context). The script checks this on a sample it
    embeds for real and prints the cosine similarity between the two, and prints how clustered the
    grown corpus is (nearest-neighbour distances against those of the real chunks): re-using real
    text makes a denser, more repetitive corpus than a real 100k-chunk knowledge base would be,
    which can make HNSW's job harder than on real content (the clustering line lets you judge). The
    full-text vector is computed by Postgres with the same expression as
    ``services.update_search_vectors``.

How to run (from the project root, with the venv active; use a database of its own):
    DATABASE_NAME=bench python manage.py migrate           # once
    DATABASE_NAME=bench python benchmarks/retrieval_latency.py [--docs PATH] [--size 100000]
        [--questions 200] [--ef-search 40,100,200,400] [--keep]

``--docs`` defaults to ``../shared/data/doc2dial/docs`` (relative to the project root); the
questions file is ``questions_dev.jsonl`` next to it (``--questions-file``). Everything is written
to the collection ``benchmark-retrieval`` (``--collection``) and deleted at the end unless
``--keep``; a later run reuses kept Doc2Dial sources (unchanged files are skipped by content hash)
and replaces kept synthetic ones. Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from environment import DEFAULT_DOCS, django_setup, docs_folder, header, load_average, progress, torch_threads

K = 10
TIE_EPSILON = 1e-6
SYNTHETIC_PREFIX = "synthetic:"
INSERT_BATCH = 2000
CHUNKS_PER_SYNTHETIC_SOURCE = 10
MIN_PART_SHARE = 1 / 4
NEAR_DUPLICATE = 0.02  # cosine distance under which two chunks count as near-duplicates


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=DEFAULT_DOCS, help=f"Doc2Dial docs folder (default {DEFAULT_DOCS})")
    parser.add_argument("--questions-file", default="",
                        help="questions JSON lines (default: questions_dev.jsonl next to the docs folder)")
    parser.add_argument("--questions", type=int, default=200, help="number of questions (default 200)")
    parser.add_argument("--size", type=int, default=100_000, help="grown corpus size in chunks (default 100000)")
    parser.add_argument("--ef-search", default="",
                        help="comma-separated hnsw.ef_search values for the recall sweep "
                             "(default 40,<HNSW_EF_SEARCH>,200,400)")
    parser.add_argument("--collection", default="benchmark-retrieval", help="dedicated collection")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the synthetic corpus")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark rows at the end")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads for the embedding model (default: torch's own, as the product)")
    parser.add_argument("--setup-threads", type=int, default=1,
                        help="torch threads while ingesting Doc2Dial and checking the synthetic vectors (setup, "
                             "not timed; default 1, much faster than 2 on busy shared cores; 0 = as --torch-threads)")
    parser.add_argument("--limit-files", type=int, default=0, help="ingest only the first N files (quick runs)")
    return parser.parse_args()


# --- SQL ------------------------------------------------------------------------------------------

_TOP_K_SQL = """
SELECT c.id, c.embedding <=> %(embedding)s::vector AS distance
FROM knowledge_chunk c
WHERE c.embedding_model = %(model)s AND c.collection = %(collection)s
ORDER BY c.embedding <=> %(embedding)s::vector
LIMIT %(k)s
"""

_INSERT_CHUNKS_SQL = """
INSERT INTO knowledge_chunk
    (source_id, ordinal, start, "end", text, heading_path, token_count, embedding, embedding_model, search_vector)
SELECT u.source_id, u.ordinal, u.start_, u.end_, u.text, u.heading_path::jsonb, u.token_count,
       u.embedding::vector, %(model)s,
       setweight(to_tsvector('english', s.title || ' ' || coalesce(
           (SELECT string_agg(value, ' ') FROM jsonb_array_elements_text(u.heading_path::jsonb)), '')), 'A')
       || setweight(to_tsvector('english', u.text), 'B')
FROM unnest(%(source_id)s::bigint[], %(ordinal)s::int[], %(start)s::int[], %(end)s::int[], %(text)s::text[],
            %(heading_path)s::text[], %(token_count)s::int[], %(embedding)s::text[])
     AS u(source_id, ordinal, start_, end_, text, heading_path, token_count, embedding)
JOIN knowledge_source s ON s.id = u.source_id
"""


_VECTOR_LITERAL = re.compile(r"'\[[-0-9.e,]+\]'")


def vector_literal(vector) -> str:
    """The literal ``chunk_search`` sends (7 significant digits), so distances compare exactly."""
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


class Database:
    """The bare SQL this benchmark runs next to ``chunk_search``."""

    def __init__(self, collection: str):
        from knowledge.embedding import model_id

        self.collection = collection
        self.model = model_id()

    def top_k(self, embedding: str, *, exact: bool, ef_search: int = 0, explain: bool = False):
        """Top-``K`` ``(id, distance)`` by cosine distance; ``exact`` disables index scans."""
        from django.db import connection, transaction

        params = {"embedding": embedding, "model": self.model, "collection": self.collection, "k": K}
        with transaction.atomic(), connection.cursor() as cursor:
            if exact:
                cursor.execute("SET LOCAL enable_indexscan = off")
            else:  # the HNSW index, even where the planner would prefer a sequential scan
                cursor.execute("SET LOCAL enable_seqscan = off")
                cursor.execute("SET LOCAL enable_sort = off")
                cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search])
                cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")  # as chunk_search does
            cursor.execute(("EXPLAIN " if explain else "") + _TOP_K_SQL, params)
            rows = cursor.fetchall()
        if explain:
            return _VECTOR_LITERAL.sub("'[...]'", "\n".join(row[0] for row in rows))
        return sorted(((row[0], float(row[1])) for row in rows), key=lambda row: (row[1], row[0]))

    def explain_chunk_search(self, sql: str, params: dict, ef_search: int) -> str:
        """EXPLAIN of a statement captured from ``chunk_search``, with the same settings."""
        from django.db import connection, transaction

        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL hnsw.ef_search = %s", [ef_search])
            cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            cursor.execute("EXPLAIN " + sql, params)
            return _VECTOR_LITERAL.sub("'[...]'", "\n".join(row[0] for row in cursor.fetchall()))

    def execute(self, sql: str, params=None):
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(sql, params)

    def count(self) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM knowledge_chunk c JOIN knowledge_source s ON s.id = c.source_id "
                "WHERE s.collection = %s", [self.collection]
            )
            return cursor.fetchone()[0]

    def delete(self, *, synthetic_only: bool) -> int:
        """Delete the collection's sources and chunks (or only the synthetic ones); returns chunks deleted."""
        from django.db import connection, transaction

        uri_filter = "AND s.uri LIKE %s" if synthetic_only else ""
        params = [self.collection] + ([SYNTHETIC_PREFIX + "%"] if synthetic_only else [])
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "DELETE FROM knowledge_chunk c USING knowledge_source s "
                f"WHERE s.id = c.source_id AND s.collection = %s {uri_filter}", params
            )
            deleted = cursor.rowcount
            cursor.execute(f"DELETE FROM knowledge_source s WHERE s.collection = %s {uri_filter}", params)
        return deleted

    def text_matches(self, tsquery: str) -> int:
        """Chunks of the collection matching the full-text leg's OR query ``tsquery``."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM knowledge_chunk c JOIN knowledge_source s ON s.id = c.source_id "
                "WHERE s.collection = %s AND c.search_vector @@ to_tsquery('english', %s)",
                [self.collection, tsquery],
            )
            return cursor.fetchone()[0]

    def out_of_line_vectors(self) -> float:
        """Share of the collection's embeddings stored out of line in the TOAST table (pgvector's
        ``vector`` has storage EXTERNAL; a row over ~2 kB moves it out), which every exact distance
        computation then has to fetch."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT avg((pg_column_toast_chunk_id(c.embedding) IS NOT NULL)::int) FROM knowledge_chunk c "
                "JOIN knowledge_source s ON s.id = c.source_id WHERE s.collection = %s", [self.collection]
            )
            return float(cursor.fetchone()[0] or 0)

    def vacuum_analyze(self) -> float:
        """``VACUUM ANALYZE`` the chunk and source tables, then recompute the collection's lexeme
        document frequencies as ingestion does (the synthetic chunks are inserted directly, not
        through it); returns seconds for both."""
        from django.db import connection

        from knowledge import services

        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE knowledge_chunk")
            cursor.execute("VACUUM ANALYZE knowledge_source")
        services.lexeme_frequencies_refresh([self.collection])
        return time.perf_counter() - started


# --- measurement ----------------------------------------------------------------------------------


def recall_at_k(returned: list[tuple[int, float]], exact: list[tuple[int, float]]) -> tuple[float, float]:
    """(id-overlap recall@K, tie-tolerant recall@K) of ``returned`` against the ``exact`` top-K."""
    if not exact:
        return 1.0, 1.0
    exact_ids = {chunk_id for chunk_id, _ in exact}
    threshold = exact[-1][1] + TIE_EPSILON
    top = returned[:K]
    by_id = sum(chunk_id in exact_ids for chunk_id, _ in top) / len(exact)
    tolerant = min(len(exact), sum(distance <= threshold for _, distance in top)) / len(exact)
    return by_id, tolerant


def measure(db: Database, queries: list[dict], ef_values: list[int], label: str) -> dict:
    """Run every variant for every query (rotating their order); returns latencies (ms), recalls
    and plan checks."""
    from django.conf import settings
    from django.db import connection

    from knowledge.evaluation import percentile
    from knowledge.selectors import chunk_search

    product_ef = max(settings.HNSW_EF_SEARCH, settings.RETRIEVAL_CANDIDATES)
    variants = ["hybrid", "vector", "text", "exact"] + [f"hnsw@{ef}" for ef in ef_values]
    latencies: dict[str, list[float]] = defaultdict(list)
    recalls: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def run(variant: str, query: dict):
        if variant in {"hybrid", "vector", "text"}:
            results = chunk_search(query["text"], k=K, collection=db.collection,
                                   query_embedding=query["embedding"], mode=variant)
            return [(r.chunk_id, r.vector_distance) for r in results]
        if variant == "exact":
            return db.top_k(query["literal"], exact=True)
        return db.top_k(query["literal"], exact=False, ef_search=int(variant.split("@")[1]))

    # Plans: the exact baseline must not touch the HNSW index; the product's legs should.
    captured = []

    def capture(execute, sql, params, many, context):
        if "WITH vec AS" in sql:
            captured.append((sql, params))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        for mode in ("vector", "text"):
            run(mode, queries[0])
    vector_plan = db.explain_chunk_search(*captured[0], ef_search=product_ef)
    text_plan = db.explain_chunk_search(*captured[1], ef_search=product_ef)
    exact_plan = db.top_k(queries[0]["literal"], exact=True, explain=True)
    if "chunk_embedding_hnsw" in exact_plan:
        raise SystemExit("error: the exact baseline's plan uses the HNSW index:\n" + exact_plan)
    hnsw_plans = {ef: db.top_k(queries[0]["literal"], exact=False, ef_search=ef, explain=True) for ef in ef_values}
    for ef, plan in hnsw_plans.items():
        if "chunk_embedding_hnsw" not in plan:
            raise SystemExit(f"error: the HNSW variant (ef_search={ef}) does not use the index:\n" + plan)

    # How much of the corpus the full-text leg has to rank: rows matching the OR query (20 questions).
    from knowledge.selectors import _tsquery_text  # the leg's own query builder

    matched = []
    for query in queries[:20]:
        tsquery = _tsquery_text(query["text"])
        matched.append(db.text_matches(tsquery) if tsquery else 0)

    progress(f"[{label}] warm-up (10 queries x {len(variants)} variants, untimed)")
    for query in queries[:10]:
        for variant in variants:
            run(variant, query)

    progress(f"[{label}] timing {len(queries)} queries x {len(variants)} variants")
    started = time.perf_counter()
    for index, query in enumerate(queries):
        shift = index % len(variants)
        results = {}
        for variant in variants[shift:] + variants[:shift]:
            t0 = time.perf_counter()
            rows = run(variant, query)
            latencies[variant].append((time.perf_counter() - t0) * 1000)
            results[variant] = rows
        exact_rows = results["exact"]
        recalls["vector"].append(recall_at_k(results["vector"], exact_rows))
        for ef in ef_values:
            recalls[f"hnsw@{ef}"].append(recall_at_k(results[f"hnsw@{ef}"], exact_rows))
        if (index + 1) % 50 == 0:
            progress(f"[{label}] {index + 1}/{len(queries)} queries, {time.perf_counter() - started:.0f} s")

    def stats(values):
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": float(np.mean(values))}

    return {
        "latency": {variant: stats(values) for variant, values in latencies.items()},
        "recall": {
            variant: {
                "by_id": float(np.mean([r[0] for r in values])),
                "tolerant": float(np.mean([r[1] for r in values])),
                "min": float(min(r[1] for r in values)),
                "perfect": float(np.mean([r[1] == 1.0 for r in values])),
            }
            for variant, values in recalls.items()
        },
        "plans": {
            "vector leg (chunk_search)": _plan_summary(vector_plan),
            "text leg (chunk_search)": _plan_summary(text_plan),
            **{f"top-10 SQL, ef_search={ef}": _plan_summary(plan) for ef, plan in hnsw_plans.items()},
            "exact baseline": _plan_summary(exact_plan),
        },
        "toasted": db.out_of_line_vectors(),
        "matched": (float(np.median(matched)), float(np.max(matched))),
        "product_ef": product_ef,
        "candidates": settings.RETRIEVAL_CANDIDATES,
        "max_matches": settings.RETRIEVAL_TEXT_MAX_MATCHES,
    }


def _plan_summary(plan: str) -> str:
    found = []
    for needle, name in (
        ("chunk_embedding_hnsw", "HNSW index scan"),
        ("chunk_collection_search_gin", "GIN index (bitmap) scan"),
        ("Seq Scan on knowledge_chunk", "sequential scan of knowledge_chunk"),
        ("Parallel Seq Scan on knowledge_chunk", "(parallel)"),
    ):
        if needle in plan:
            found.append(name)
    return ", ".join(found) or "no knowledge_chunk access found"


def print_results(label: str, n_chunks: int, n_queries: int, result: dict, embed_stats: dict,
                  ef_values: list[int]) -> None:
    lat, rec = result["latency"], result["recall"]
    exact = lat["exact"]["p50"]
    print()
    print(f"## {label}: {n_chunks} chunks, {n_queries} questions, k={K}, collection filter on")
    print()
    print("| retrieval call | p50 ms | p95 ms | mean ms | p50 / exact p50 |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("chunk_search hybrid (product)", "hybrid"),
        ("chunk_search mode=vector", "vector"),
        ("chunk_search mode=text", "text"),
        *[(f"top-10 SQL, HNSW index (forced), ef_search={ef}", f"hnsw@{ef}") for ef in ef_values],
        ("top-10 SQL, exact scan (baseline)", "exact"),
    ]
    for name, key in rows:
        s = lat[key]
        print(f"| {name} | {s['p50']:.2f} | {s['p95']:.2f} | {s['mean']:.2f} | {s['p50'] / exact:.3f} |")
    for threads, stats in sorted(embed_stats.items(), reverse=True):
        print(f"| (query embedding: one encode call, {threads} torch thread{'s' if threads > 1 else ''}; "
              f"add to chunk_search) | {stats['p50']:.2f} | {stats['p95']:.2f} | {stats['mean']:.2f} | |")
    print()
    print("| vector retrieval | ef_search | recall@10 | recall@10 (ids only) | min | queries at 1.0 |")
    print("|---|---:|---:|---:|---:|---:|")
    r = rec["vector"]
    planner = "" if "HNSW" in result["plans"]["vector leg (chunk_search)"] else ", planner chose an exact scan"
    print(f"| chunk_search mode=vector (product: top {K} of {result['candidates']} candidates{planner}) "
          f"| {result['product_ef']} | {r['tolerant']:.4f} | {r['by_id']:.4f} | {r['min']:.1f} | {r['perfect']:.3f} |")
    for ef in ef_values:
        r = rec[f"hnsw@{ef}"]
        print(f"| top-10 SQL, HNSW index (forced) | {ef} | {r['tolerant']:.4f} | {r['by_id']:.4f} | {r['min']:.1f} | {r['perfect']:.3f} |")
    print("| top-10 SQL, exact scan (baseline) | - | 1.0000 | 1.0000 | 1.0 | 1.000 |")
    print()
    for name, summary in result["plans"].items():
        print(f"plan, {name}: {summary}")
    print(f"embeddings stored out of line (TOAST): {100 * result['toasted']:.0f}% of the chunks")
    print(f"full-text leg: the OR query of a question matches {result['matched'][0]:.0f} chunks (median of 20 "
          f"questions; max {result['matched'][1]:.0f}) = {100 * result['matched'][0] / n_chunks:.0f}% of the corpus, "
          f"of which the full-text leg ranks at most RETRIEVAL_TEXT_MAX_MATCHES={result['max_matches']} (the matches of "
          f"the query's rarest words) before the top {result['candidates']} are kept")


# --- the corpus -----------------------------------------------------------------------------------


def ingest_doc2dial(docs: Path, collection: str, limit: int = 0) -> tuple[int, int, float]:
    """Ingest the docs folder (its first ``limit`` files, if given) into ``collection`` through the
    real services; returns (files ingested now, files unchanged from a kept run, seconds)."""
    from knowledge import services

    started = time.perf_counter()
    files = services.iter_files([docs])[: limit or None]
    registered = services.sources_register_paths(files, collection=collection, enqueue=False)
    ids = [source.pk for source in registered.queued]
    progress(f"ingesting {len(ids)} files ({len(registered.unchanged)} unchanged from a kept run)")
    failed = []
    for index, source_id in enumerate(ids, start=1):
        result = services.document_ingest(source_id)
        if result.status != "ingested":
            failed.append(f"{source_id}: {result.error}")
        if index % 25 == 0 or index == len(ids):
            progress(f"ingested {index}/{len(ids)} files, {time.perf_counter() - started:.0f} s")
    if failed:
        progress(f"warning: {len(failed)} files failed: {failed[:3]}")
    return len(ids), len(registered.unchanged), time.perf_counter() - started


def load_queries(path: Path, n: int, model, thread_counts: list[int]) -> tuple[list[dict], dict, int]:
    """``n`` questions spread evenly over the file, their retrieval texts and embeddings. Each is
    embedded with one encode call per torch thread count in ``thread_counts`` (alternating which
    goes first), timed; returns (queries, {threads: latency stats in ms}, first turns)."""
    import torch

    from knowledge.evaluation import percentile
    from knowledge.selectors import retrieval_query

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    picks = sorted(set(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int).tolist()))
    queries, timings = [], defaultdict(list)
    for position, index in enumerate(picks):
        row = rows[index]
        text = retrieval_query(row["question"], row.get("history") or [])
        order = thread_counts if position % 2 == 0 else thread_counts[::-1]
        for threads in order:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            vector = model.encode([text])[0]
            timings[threads].append((time.perf_counter() - t0) * 1000)
        queries.append({"text": text, "embedding": vector, "literal": vector_literal(vector),
                        "first_turn": bool(row.get("is_first_turn"))})
    stats = {
        threads: {"p50": percentile(values, 50), "p95": percentile(values, 95), "mean": float(np.mean(values))}
        for threads, values in timings.items()
    }
    return queries, stats, sum(q["first_turn"] for q in queries)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_in_halves(text: str) -> list[str]:
    """``text`` cut at the sentence end nearest its middle (both halves stripped); ``[text]`` if it
    has one sentence."""
    cuts = [m.end() for m in _SENTENCE_END.finditer(text) if 0 < m.start() < len(text)]
    if not cuts:
        return [text]
    cut = min(cuts, key=lambda c: abs(c - len(text) / 2))
    halves = [text[:cut].strip(), text[cut:].strip()]
    return [h for h in halves if h] or [text]


def grow_corpus(db: Database, target: int, seed: int, model) -> dict:
    """Add synthetic chunks until the collection holds ``target`` chunks (see "How the corpus is
    grown" in the module docstring). Returns figures about the growth and the checks."""
    from django.conf import settings

    from knowledge.embedding import passage_text
    from knowledge.models import Chunk, Source

    real = list(
        Chunk.objects.filter(source__collection=db.collection)
        .exclude(source__uri__startswith=SYNTHETIC_PREFIX)
        .order_by("pk")
        .values_list("source_id", "source__uri", "source__title", "heading_path", "text", "embedding")
    )
    need = target - len(real)
    if need <= 0:
        return {"added": 0}
    rng = np.random.default_rng(seed)
    real_vectors = np.asarray([np.asarray(row[5], dtype=np.float32) for row in real])

    # Parts: each real chunk cut in two at a sentence end, each half embedded for real (with its
    # chunk's title and headings in front, as passage_text does).
    parts = [(index, half) for index, row in enumerate(real) for half in split_in_halves(row[4])]
    part_texts = [passage_text(real[i][2], real[i][3], half) for i, half in parts]
    progress(f"embedding {len(parts)} half-chunks (real model, batch {settings.EMBEDDING_BATCH_SIZE})")
    t0 = time.perf_counter()
    vectors = model.encode(part_texts)
    parts_encode_s = time.perf_counter() - t0
    # Mean-pooling weights: tokens of the first part with its context and [CLS]/[SEP]; tokens of the
    # second part's text alone (it follows the first inside one passage).
    with_context = np.asarray([model.count_tokens(t) + 2 for t in part_texts])
    text_only = np.asarray([model.count_tokens(half) for _, half in parts])
    by_domain: dict[str, list[int]] = defaultdict(list)
    for p, (index, _) in enumerate(parts):
        by_domain[Path(real[index][1]).parent.name].append(p)
    domains = sorted(by_domain)
    domain_p = np.asarray([len(by_domain[d]) for d in domains], dtype=float)
    domain_p /= domain_p.sum()

    # Pairs of halves from two different chunks of one domain, such that the joined passage fits the
    # model's window (the model would see both), each part has at least MIN_PART_SHARE of the tokens
    # (no near-copy of one half), and each unordered pair is used once.
    window = model.max_seq_length
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    attempts = 0
    while len(pairs) < need:
        attempts += 1
        if attempts > 50 * need:
            raise SystemExit(f"error: found only {len(pairs)} distinct pairs for {need} synthetic chunks")
        members = by_domain[domains[rng.choice(len(domains), p=domain_p)]]
        a, b = (int(x) for x in rng.choice(members, size=2, replace=False))
        if parts[a][0] == parts[b][0]:
            continue
        total = with_context[a] + text_only[b]
        key = (min(a, b), max(a, b))
        if total <= window and min(with_context[a], text_only[b]) >= MIN_PART_SHARE * total and key not in seen:
            seen.add(key)
            pairs.append((a, b))
    pairs.sort()  # groups the synthetic chunks by their first part's chunk (and so source)
    a_idx = np.asarray([p[0] for p in pairs])
    b_idx = np.asarray([p[1] for p in pairs])
    mixed = with_context[a_idx, None] * vectors[a_idx] + text_only[b_idx, None] * vectors[b_idx]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    texts = [parts[a][1] + "\n\n" + parts[b][1] for a, b in pairs]
    first_chunk = [real[parts[a][0]] for a, _ in pairs]

    # How clustered is the grown corpus? Nearest-neighbour cosine distance of a sample of synthetic
    # chunks within the whole grown corpus, beside that of the real chunks among themselves.
    corpus = np.vstack([real_vectors, mixed])
    probe = rng.choice(need, size=min(300, need), replace=False) + len(real)
    similarity = corpus[probe] @ corpus.T
    similarity[np.arange(len(probe)), probe] = -np.inf
    synthetic_nn = 1 - similarity.max(axis=1)
    real_similarity = real_vectors @ real_vectors.T
    np.fill_diagonal(real_similarity, -np.inf)
    real_nn = 1 - real_similarity.max(axis=1)
    used = np.bincount(np.concatenate([a_idx, b_idx]), minlength=len(parts))

    # Check the approximation on a sample embedded for real, and time the real encode rate.
    sample = rng.choice(need, size=min(32, need), replace=False)
    sample_texts = [passage_text(first_chunk[i][2], first_chunk[i][3], texts[i]) for i in sample]
    progress(f"embedding {len(sample)} synthetic texts for real to check the approximation")
    t0 = time.perf_counter()
    true_vectors = model.encode(sample_texts)
    encode_rate = len(sample) / (time.perf_counter() - t0)
    cosines = np.sum(true_vectors * mixed[sample], axis=1)
    cos_first_part = np.sum(true_vectors * vectors[a_idx[sample]], axis=1)  # a cruder stand-in, for scale
    truncated = np.mean([model.count_tokens(t) + 2 > window for t in sample_texts])

    # Sources: one per run of <= 10 synthetic chunks whose first part comes from the same source.
    progress(f"creating sources for {need} synthetic chunks")
    t_insert = time.perf_counter()
    groups: list[list[int]] = []
    for i in range(need):
        if (groups and len(groups[-1]) < CHUNKS_PER_SYNTHETIC_SOURCE
                and first_chunk[groups[-1][0]][0] == first_chunk[i][0]):
            groups[-1].append(i)
        else:
            groups.append([i])
    sources = [
        Source(
            collection=db.collection, uri=f"{SYNTHETIC_PREFIX}{number:06d}", kind=Source.Kind.FILE,
            title=first_chunk[group[0]][2], text="\n\n".join(texts[i] for i in group),
            status=Source.Status.READY, progress=100, chunk_count=len(group),
        )
        for number, group in enumerate(groups)
    ]
    Source.objects.bulk_create(sources, batch_size=1000)
    source_ids = dict(Source.objects.filter(collection=db.collection, uri__startswith=SYNTHETIC_PREFIX)
                      .values_list("uri", "pk"))

    columns = {key: [] for key in ("source_id", "ordinal", "start", "end", "text", "heading_path", "token_count")}
    for number, group in enumerate(groups):
        offset = 0
        for ordinal, i in enumerate(group):
            columns["source_id"].append(source_ids[f"{SYNTHETIC_PREFIX}{number:06d}"])
            columns["ordinal"].append(ordinal)
            columns["start"].append(offset)
            columns["end"].append(offset + len(texts[i]))
            columns["text"].append(texts[i])
            columns["heading_path"].append(json.dumps(first_chunk[i][3]))
            columns["token_count"].append(int(text_only[a_idx[i]] + text_only[b_idx[i]]))
            offset += len(texts[i]) + 2
    progress(f"inserting {need} chunks in batches of {INSERT_BATCH} (HNSW + GIN maintained on insert)")
    for offset in range(0, need, INSERT_BATCH):
        batch = {key: values[offset: offset + INSERT_BATCH] for key, values in columns.items()}
        batch["embedding"] = [vector_literal(v) for v in mixed[offset: offset + INSERT_BATCH]]
        db.execute(_INSERT_CHUNKS_SQL, {**batch, "model": db.model})
        done = min(need, offset + INSERT_BATCH)
        if done % 20_000 < INSERT_BATCH or done == need:
            elapsed = time.perf_counter() - t_insert
            progress(f"inserted {done}/{need} chunks, {elapsed:.0f} s ({done / elapsed:.0f} chunks/s)")
    insert_s = time.perf_counter() - t_insert
    progress("VACUUM ANALYZE")
    vacuum_s = db.vacuum_analyze()
    real_chars = float(np.mean([len(row[4]) for row in real]))
    return {
        "added": need,
        "sources": len(groups),
        "parts": len(parts),
        "parts_encode_s": parts_encode_s,
        "insert_s": insert_s,
        "vacuum_s": vacuum_s,
        "cos_mean": float(cosines.mean()),
        "cos_min": float(cosines.min()),
        "cos_first_mean": float(cos_first_part.mean()),
        "sample": len(sample),
        "encode_rate": encode_rate,
        "truncated": float(truncated),
        "nn_real": (float(np.median(real_nn)), float(np.percentile(real_nn, 10)), float(np.mean(real_nn < NEAR_DUPLICATE))),
        "nn_synthetic": (float(np.median(synthetic_nn)), float(np.percentile(synthetic_nn, 10)),
                         float(np.mean(synthetic_nn < NEAR_DUPLICATE))),
        "parts_used": (int((used > 0).sum()), int(used.max()), float(np.median(used[used > 0]))),
        "chars": (real_chars, float(np.mean([len(t) for t in texts]))),
        "real_chunks": len(real),
        "domains": dict(Counter(Path(row[1]).parent.name for row in first_chunk)),
    }


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    docs = docs_folder(args.docs)
    questions_path = Path(args.questions_file) if args.questions_file else docs.parent / "questions_dev.jsonl"
    if not questions_path.is_file():
        raise SystemExit(f"error: questions file not found: {questions_path} (pass --questions-file PATH)")
    django_setup()

    from django.conf import settings

    from knowledge import embedding as embedding_module
    from knowledge.models import HNSW_EF_CONSTRUCTION, HNSW_M

    ef_values = sorted({int(x) for x in args.ef_search.split(",") if x.strip()} or
                       {40, settings.HNSW_EF_SEARCH, 200, 400})
    db = Database(args.collection)
    run_started = time.perf_counter()

    torch_threads(args.torch_threads)
    import torch

    product_threads = torch.get_num_threads()
    setup_threads = args.setup_threads or product_threads
    progress("loading the embedding model")
    model = embedding_module.get_embedding_model()
    model.encode(["warm-up sentence for the embedding model"] * 8)
    print(header("Retrieval latency and HNSW recall@10: chunk_search vs exact scan, Doc2Dial size and grown", [
        ("data", f"{docs} (273 help pages expected); questions {questions_path}"),
        ("collection", f"{args.collection!r} ({'kept' if args.keep else 'deleted'} at the end)"),
        ("torch threads", f"{product_threads} (as the product runs) for the timed query embeddings, also 1 for "
                          f"comparison; {setup_threads} while ingesting and checking (setup, not timed)"),
        ("retrieval settings", f"HNSW_EF_SEARCH={settings.HNSW_EF_SEARCH}, RETRIEVAL_CANDIDATES="
                               f"{settings.RETRIEVAL_CANDIDATES}, RRF_K={settings.RRF_K}, RETRIEVAL_TEXT_MAX_MATCHES="
                               f"{settings.RETRIEVAL_TEXT_MAX_MATCHES}; HNSW m={HNSW_M}, "
                               f"ef_construction={HNSW_EF_CONSTRUCTION}, cosine"),
    ]), flush=True)

    try:
        leftover = db.delete(synthetic_only=True)
        if leftover:
            progress(f"deleted {leftover} synthetic chunks left by an earlier --keep run")
            db.vacuum_analyze()
        torch.set_num_threads(setup_threads)
        ingested, unchanged, ingest_s = ingest_doc2dial(docs, args.collection, args.limit_files)
        vacuum_s = db.vacuum_analyze()
        size_a = db.count()
        print(f"\nDoc2Dial collection: {size_a} chunks ({ingested} files ingested in {ingest_s:.0f} s through "
              f"services.document_ingest, {unchanged} unchanged from a kept run); VACUUM ANALYZE + lexeme frequencies {vacuum_s:.1f} s")

        progress(f"embedding {args.questions} questions (one encode call each per thread count, timed)")
        queries, embed_stats, first_turns = load_queries(
            questions_path, args.questions, model, sorted({product_threads, 1}, reverse=True))
        torch.set_num_threads(setup_threads)
        print(f"questions: {len(queries)} spread evenly over {questions_path.name} ({first_turns} first turns, "
              f"the rest follow-ups with history); retrieval text = retrieval_query(question, history)")

        result_a = measure(db, queries, ef_values, "Doc2Dial size")
        print_results("A. Doc2Dial size", size_a, len(queries), result_a, embed_stats, ef_values)

        if args.size <= size_a:
            print(f"\n--size {args.size} is not above the Doc2Dial size; no growth.")
            return
        progress(f"growing the collection to {args.size} chunks")
        growth = grow_corpus(db, args.size, args.seed, model)
        size_b = db.count()
        print()
        print(f"Grown corpus: {size_b} chunks = {growth['real_chunks']} real + {growth['added']} synthetic in "
              f"{growth['sources']} synthetic sources; inserted in {growth['insert_s']:.0f} s "
              f"({growth['added'] / growth['insert_s']:.0f} chunks/s with the HNSW and GIN indexes maintained), "
              f"VACUUM ANALYZE + lexeme frequencies {growth['vacuum_s']:.1f} s.")
        print(f"  synthetic chunk = halves of two different real chunks of one domain, joined (domains: "
              f"{growth['domains']}); {growth['parts']} halves embedded for real in {growth['parts_encode_s']:.0f} s; "
              f"vector = token-weighted mean of the two halves' embeddings, normalised. Mean length "
              f"{growth['chars'][1]:.0f} characters (real chunks {growth['chars'][0]:.0f}).")
        print(f"  why not embed every synthetic chunk: the real model encoded a sample of {growth['sample']} at "
              f"{growth['encode_rate']:.1f} chunks/s on this machine now ({setup_threads} torch thread(s)), so "
              f"{growth['added']} would take ~{growth['added'] / growth['encode_rate'] / 60:.0f} min.")
        print(f"  check on that sample: cosine(real embedding, approximation) mean {growth['cos_mean']:.3f}, "
              f"min {growth['cos_min']:.3f} (for scale, the first half's embedding alone: mean "
              f"{growth['cos_first_mean']:.3f}); {100 * growth['truncated']:.0f}% of the sample exceeds the "
              f"model's 256-token window.")
        parts_used, most, median_use = growth["parts_used"]
        print(f"  halves used: {parts_used} of {growth['parts']}, median {median_use:.0f} synthetic chunks each, "
              f"at most {most}.")
        print("  clustering: nearest-neighbour cosine distance, median / p10 / share under "
              f"{NEAR_DUPLICATE} (near-duplicates): real Doc2Dial chunks among themselves "
              f"{growth['nn_real'][0]:.3f} / {growth['nn_real'][1]:.3f} / {100 * growth['nn_real'][2]:.1f}%; "
              f"synthetic chunks within the grown corpus (sample of 300) {growth['nn_synthetic'][0]:.3f} / "
              f"{growth['nn_synthetic'][1]:.3f} / {100 * growth['nn_synthetic'][2]:.1f}%.")

        result_b = measure(db, queries, ef_values, f"{size_b} chunks")
        print_results(f"B. grown to {size_b} chunks", size_b, len(queries), result_b, embed_stats, ef_values)

        print()
        print("## Summary (p50 / p95 ms; recall@10 of the product's vector leg against the exact scan)")
        print()
        print(f"| size | hybrid | vector leg | text leg | exact scan (baseline) | hybrid p50 / exact p50 | recall@10 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for size, result in ((size_a, result_a), (size_b, result_b)):
            lat = result["latency"]
            cells = [f"{lat[v]['p50']:.1f} / {lat[v]['p95']:.1f}" for v in ("hybrid", "vector", "text", "exact")]
            print(f"| {size} | " + " | ".join(cells)
                  + f" | {lat['hybrid']['p50'] / lat['exact']['p50']:.3f} | {result['recall']['vector']['tolerant']:.4f} |")
    finally:
        if args.keep:
            progress(f"--keep: leaving collection {args.collection!r} ({db.count()} chunks)")
        else:
            progress(f"deleting collection {args.collection!r}")
            deleted = db.delete(synthetic_only=False)
            cleanup_s = db.vacuum_analyze()
            progress(f"deleted {deleted} chunks; VACUUM ANALYZE {cleanup_s:.0f} s")
        print(f"\nload average at the end: {load_average()} (1/5/15 min); total run time "
              f"{(time.perf_counter() - run_started) / 60:.1f} min; collection {args.collection!r} "
              f"{'kept' if args.keep else 'deleted'}")


if __name__ == "__main__":
    main()
