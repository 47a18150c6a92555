"""Chunk-size sweep for retrieval on Doc2Dial first turns (in memory, no database).

For each ``--sizes`` value: parse and chunk every page with the product's parser and chunker, embed
the chunks with the configured embedding model, and print passage-hit@1/5/10, document-hit@5/10 and
MRR@10 for the vector leg, BM25 (the baseline) and their reciprocal-rank fusion (k = 60), side by
side. It mirrors ``chunk_search`` without Postgres so that a sweep takes minutes, not a re-ingest per
size; the database path is measured by ``manage.py evaluate_retrieval``.

    .venv/bin/python benchmarks/chunk_size_sweep.py --sizes 160,256,384
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402

from knowledge.chunking import chunk_document  # noqa: E402
from knowledge.embedding import get_embedding_model, model_id, passage_text  # noqa: E402
from knowledge.evaluation import BM25Baseline, RankedPassage, load_questions, score_rankings, tokenize  # noqa: E402
from knowledge.parsers import parse_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "doc2dial"))
    parser.add_argument("--sizes", default="160,256,384")
    parser.add_argument("--rrf-k", type=int, default=60)
    parser.add_argument("--candidates", type=int, default=50)
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "questions_dev.jsonl").exists():
        sys.exit(f"Doc2Dial not found at {data} (pass --data)")
    questions = [q for q in load_questions(data / "questions_dev.jsonl") if q.is_first_turn]
    model = get_embedding_model()
    query_vectors = model.encode([q.question for q in questions])
    files = sorted((data / "docs").rglob("*.txt"))
    print(f"{len(questions)} first-turn questions, {len(files)} pages, embedding model {model_id()}")
    print("| size | chunks | mean chars | system | P@1 | P@5 | P@10 | D@5 | D@10 | MRR@10 |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        passages, texts = [], []
        for path in files:
            document = parse_file(path.name, path.read_bytes())
            for span in chunk_document(document, max_tokens=size, count_tokens=model.count_tokens):
                text = document.text[span.start : span.end]
                relative = str(path.relative_to(data))
                passages.append((relative, span.start, span.end, " ".join([document.title, *span.heading_path]) + "\n" + text))
                texts.append(passage_text(document.title, span.heading_path, text))
        started = time.perf_counter()
        vectors = model.encode(texts)
        embed_s = time.perf_counter() - started
        bm25 = BM25Baseline(passages)
        ranked = [RankedPassage(f, s, e) for f, s, e, _ in passages]
        systems: dict[str, list] = {"vector": [], "BM25": [], "RRF": []}
        for index, question in enumerate(questions):
            vector_order = np.argsort(-(vectors @ query_vectors[index]), kind="stable")
            text_order = np.argsort(-bm25.index.get_scores(tokenize(question.question)), kind="stable")
            fused: dict[int, float] = {}
            for order in (vector_order, text_order):
                for rank, i in enumerate(order[: args.candidates], start=1):
                    fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (args.rrf_k + rank)
            rrf_order = sorted(fused, key=lambda i: -fused[i])
            for name, order in (("vector", vector_order), ("BM25", text_order), ("RRF", rrf_order)):
                systems[name].append([ranked[i] for i in order[:10]])
        mean_chars = np.mean([e - s for _, s, e, _ in passages])
        for name, rankings in systems.items():
            sc = score_rankings(questions, rankings)
            print(f"| {size} | {len(passages)} | {mean_chars:.0f} | {name} | {sc.passage_hit[1]:.3f} | "
                  f"{sc.passage_hit[5]:.3f} | {sc.passage_hit[10]:.3f} | {sc.document_hit[5]:.3f} | "
                  f"{sc.document_hit[10]:.3f} | {sc.mrr:.3f} |")
        print(f"(size {size}: embedded {len(texts)} chunks in {embed_s:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
