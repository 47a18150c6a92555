"""Retrieval learning from corrections: the embedder fine-tuned on approved corrections, measured on
held-out Doc2Dial dialogues beside the base embedder and BM25, in one run.

Steps (the product's own code where it exists):

1. ``seed_training_data`` on ``--questions`` (default: all 2,022 Doc2Dial dev questions, every turn,
   with the retrieval context they really had): one approved correction per question, its gold
   chunks as the agent's pick and the chunks retrieval showed for it;
2. the training examples of those corrections (``tuning.embedder_training.embedder_examples``: anchor =
   the question with its retrieval context, positive = a picked chunk, hard negative = a shown chunk
   not picked), split by ``tuning.datasets.correction_split`` (by dialogue; the LoRA datasets' split,
   ``--holdout-share`` of the dialogues held out);
3. fine-tune (``embedder_train``, MultipleNegativesRankingLoss) on the training split, timed;
4. re-embed every chunk of the collection with the fine-tuned model, timed, and extrapolated to
   100,000 chunks (encoding only; the database write is not included);
5. score held-out questions (dialogues never trained on): passage-hit@1/5/10, document-hit@5/10,
   MRR@10 (``knowledge.evaluation``) for
   - ``base, chunk_search``: the serving path as it is (HNSW vector leg + full-text leg, RRF);
   - ``base, vector`` / ``tuned, vector``: exact cosine search over the stored base vectors / the
     re-embedded vectors;
   - ``base, hybrid`` / ``tuned, hybrid``: that vector leg fused with the same full-text leg
     (``chunk_search(mode="text")``) by the same RRF (``RETRIEVAL_CANDIDATES`` per leg, ``RRF_K``),
     as ``chunk_search`` does (exact instead of HNSW search: compare ``base, hybrid`` with
     ``base, chunk_search`` to see the difference);
   - ``BM25``: plain BM25 over the same chunks (``knowledge.evaluation.BM25Baseline``);
   - with ``--vector-weights 1.5,2``: ``base, hybrid w=W`` / ``tuned, hybrid w=W``, the same fusion
     with the vector leg's reciprocal ranks weighted W (the full-text leg's 1), since a better vector
     leg may deserve more weight than RRF's equal share.

   ``--model FOLDER`` scores a fine-tuned folder saved by an earlier run (``--output-dir``) instead of
   training; the split (steps 1-2) is recomputed and must be the one it was trained on.

   The query is the question for first turns and ``retrieval_query`` (the question and the earlier
   user questions) for all turns. Tables: first turns and all turns, each for all held-out
   questions, those whose gold page has a training correction ("pages with corrections") and those
   whose page has none ("pages without").

    EMBEDDED_SERVICES=1 DATABASE_NAME=embedbench .venv/bin/python manage.py ingest \\
        ../shared/data/doc2dial/docs --collection doc2dial --sync
    EMBEDDED_SERVICES=1 DATABASE_NAME=embedbench .venv/bin/python benchmarks/retriever_learning.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import django_setup, header, torch_threads  # noqa: E402

DEFAULT_QUESTIONS = "../shared/data/doc2dial/questions_dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS)
    parser.add_argument("--collection", default="doc2dial")
    parser.add_argument("--holdout-share", type=float, default=None, help="default TUNING_HOLDOUT_SHARE")
    parser.add_argument("--max-train", type=int, default=None, help="train on a seeded random sample of N examples (keeps a run to a few minutes of CPU)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--max-seq-length", type=int, default=128, help="tokens per training text (passages are cut)")
    parser.add_argument("--no-hard-negatives", action="store_true")
    parser.add_argument("--mini-batch-size", type=int, default=0,
                        help="0: MultipleNegativesRankingLoss; N: its cached (GradCache) variant, N texts at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the cores are shared)")
    parser.add_argument("--output-dir", default=None, help="keep the fine-tuned model here (default: a temp folder)")
    parser.add_argument("--model", default=None,
                        help="score this saved fine-tuned folder instead of training (steps 1-2 still run: the split)")
    parser.add_argument("--vector-weights", default="",
                        help="comma-separated RRF weights of the vector leg (full-text leg 1) to add as "
                             "'base, hybrid w=W' and 'tuned, hybrid w=W' columns, e.g. 1.5,2")
    args = parser.parse_args()

    django_setup()
    torch_threads(args.threads)
    import numpy as np
    from django.conf import settings
    from sentence_transformers import SentenceTransformer

    from knowledge.embedding import get_embedding_model, passage_text
    from knowledge.evaluation import (BM25Baseline, RankedPassage, format_table, load_questions, run_retriever,
                                      score_rankings)
    from knowledge.models import Chunk, Source
    from knowledge.selectors import chunk_search, retrieval_query
    from tuning.datasets import correction_split
    from tuning.embedder_evaluation import rrf_fuse, text_legs, vector_leg
    from tuning.embedder_training import (EmbedderHyperparameters, embedder_examples, embedder_train,
                                          examples_sha256)
    from tuning.models import Correction
    from tuning.seeding import dialogue_of, training_data_seed

    holdout_share = settings.TUNING_HOLDOUT_SHARE if args.holdout_share is None else args.holdout_share
    hp = EmbedderHyperparameters(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                 max_seq_length=args.max_seq_length, hard_negatives=not args.no_hard_negatives,
                                 mini_batch_size=args.mini_batch_size)
    print(header("retriever_learning: base vs fine-tuned embedder (vector, hybrid) vs BM25 on held-out dialogues",
                 [("arguments", str(vars(args))), ("hyper-parameters", str(hp.as_dict())),
                  ("holdout share", f"{holdout_share} of dialogues (tuning.datasets.correction_split)")]), flush=True)
    if not Source.objects.filter(collection=args.collection, status="ready").exists():
        sys.exit(f"collection {args.collection!r} is empty: ingest ../shared/data/doc2dial/docs first (see the docstring)")

    questions_path = Path(args.questions)
    root = questions_path.parent.resolve()
    gold = load_questions(questions_path)
    started = time.perf_counter()
    seeded = training_data_seed(gold, docs_root=root, collection=args.collection)
    print(f"seeding: {seeded.created} new, {seeded.existing} already seeded, {len(seeded.skipped)} skipped, "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    corrections = list(Correction.objects.filter(
        seeded=True, status=Correction.Status.APPROVED, stale=False, seed_key__startswith=f"{args.collection}:",
    ).order_by("pk"))
    examples = embedder_examples(corrections, holdout_share=holdout_share)
    train = examples["train"]
    if args.max_train and args.max_train < len(train):  # a seeded sample across all training dialogues
        import random

        train = random.Random(hp.seed).sample(train, args.max_train)
    with_negative = sum(1 for e in train if e.negative)
    print(f"examples: {len(train)} training ({with_negative} with a hard negative) from "
          f"{len({e.correction_id for e in train})} corrections; {len(examples['heldout'])} held out; "
          f"sha256 {examples_sha256(train)[:12]}", flush=True)

    # Held-out questions: every question of a held-out dialogue (the same split as the corrections').
    def split_of(question) -> str:
        return correction_split(Correction(seeded=True, seed_group=dialogue_of(question)), holdout_share)

    heldout = [q for q in gold if split_of(q) == "heldout"]
    by_key = {f"{args.collection}:{q.qid}": q for q in gold}
    trained_corrections = {e.correction_id for e in train}
    corrected_pages = {by_key[c.seed_key].gold_file for c in corrections
                       if c.pk in trained_corrections and c.seed_key in by_key}

    # Seeded corrections are curated answers of the collection (issue 11 §1): they are not passages, and
    # a held-out question would find its own, so every leg searches the collection's passages only.
    curated = (Source.Kind.CURATED,)
    chunks = list(Chunk.objects.filter(source__collection=args.collection).exclude(source__kind__in=curated)
                  .select_related("source")
                  .only("id", "start", "end", "text", "heading_path", "embedding", "source__uri", "source__title")
                  .order_by("pk"))
    relative = {}
    for chunk in chunks:
        uri = chunk.source.uri
        if uri not in relative:
            try:
                relative[uri] = str(Path(uri).resolve().relative_to(root))
            except ValueError:
                relative[uri] = uri
    passage_of = {c.pk: RankedPassage(relative[c.source.uri], c.start, c.end) for c in chunks}
    chunk_ids = np.array([c.pk for c in chunks], dtype=np.int64)
    texts = [passage_text(c.source.title, c.heading_path, c.text) for c in chunks]
    base_vectors = np.array([np.asarray(c.embedding, dtype=np.float32) for c in chunks])
    bm25 = BM25Baseline([(relative[c.source.uri], c.start, c.end,
                          f"{' '.join([c.source.title, *c.heading_path])}\n{c.text}") for c in chunks])

    if args.model:
        folder = Path(args.model)
        print(f"training: skipped, scoring the saved model {folder}", flush=True)
    else:
        folder = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="embedder-"))
        torch_threads(args.threads)  # loading the serving embedder (seeding) set EMBEDDING_THREADS
        trained = embedder_train(settings.EMBEDDING_MODEL, train, folder, hp)
        peak_train_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        curve = trained.loss_curve
        print(f"training: {trained.examples} examples, {trained.steps} steps, {trained.duration_s:.0f} s "
              f"({trained.duration_s / max(1, trained.steps):.1f} s/step); loss {curve[0]['loss']:.3f} -> "
              f"{np.mean([p['loss'] for p in curve[-5:]]):.3f} (mean of the last 5 steps); peak RSS "
              f"{peak_train_mb:.0f} MB", flush=True)
    vector_weights = [float(w) for w in args.vector_weights.split(",") if w.strip()]

    tuned = SentenceTransformer(str(folder), device="cpu")
    started = time.perf_counter()
    tuned_vectors = tuned.encode(texts, batch_size=settings.EMBEDDING_BATCH_SIZE, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    reembed_s = time.perf_counter() - started
    print(f"re-embedding: {len(texts)} chunks in {reembed_s:.0f} s ({len(texts) / reembed_s:.1f} chunks/s); "
          f"100,000 chunks extrapolated: {reembed_s / len(texts) * 100_000 / 60:.0f} min (encoding only, "
          f"{args.threads} thread(s))", flush=True)

    def query_text(question, first: bool) -> str:
        return question.question if first else retrieval_query(question.question, question.history)

    candidates = settings.RETRIEVAL_CANDIDATES

    base_model = get_embedding_model()
    for first in (True, False):
        subset = [q for q in heldout if q.is_first_turn] if first else heldout
        queries = [query_text(q, first) for q in subset]
        base_q = base_model.encode(queries)
        tuned_q = tuned.encode(queries, batch_size=settings.EMBEDDING_BATCH_SIZE, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        texts_legs = text_legs(queries, args.collection, candidates)  # curated answers excluded
        index_of = {id(q): i for i, q in enumerate(subset)}

        def system(kind):
            def retrieve(question):
                i = index_of[id(question)]
                if kind == "base, chunk_search":
                    results = chunk_search(queries[i], k=10, collection=args.collection, query_embedding=base_q[i],
                                           exclude_kinds=curated)
                    return [passage_of[r.chunk_id] for r in results]
                if kind == "BM25":
                    return bm25.search(queries[i], 10)
                vectors, query_vector = (base_vectors, base_q[i]) if kind.startswith("base") else (tuned_vectors, tuned_q[i])
                leg = vector_leg(chunk_ids, vectors, query_vector, candidates)
                if kind.endswith("vector"):
                    ids = leg[:10]
                else:
                    weight = float(kind.split("w=")[1]) if "w=" in kind else 1.0
                    ids = rrf_fuse([leg, texts_legs[i]], 10, weights=[weight, 1.0])
                return [passage_of[cid] for cid in ids]
            return retrieve

        names = ["base, chunk_search", "base, vector", "tuned, vector", "base, hybrid", "tuned, hybrid",
                 *[f"{arm}, hybrid w={w:g}" for w in vector_weights for arm in ("base", "tuned")], "BM25"]
        label = "first turns (question alone)" if first else "all turns (question + earlier user questions)"
        groups = [("all held-out", subset),
                  ("pages with corrections", [q for q in subset if q.gold_file in corrected_pages]),
                  ("pages without corrections", [q for q in subset if q.gold_file not in corrected_pages])]
        for group, questions in groups:
            if not questions:
                print(f"\n### {label}, {group}: no questions\n")
                continue
            columns = {}
            for name in names:
                rankings, latencies = run_retriever(questions, system(name))
                columns[name] = score_rankings(questions, rankings, latencies)
            table = "\n".join(line for line in format_table(columns).splitlines() if "latency" not in line)
            print(f"\n### {label}, {group}\n\n{table}\n", flush=True)
    print(f"held-out: {len(heldout)} questions ({sum(q.is_first_turn for q in heldout)} first turns) from "
          f"{len({dialogue_of(q) for q in heldout})} dialogues; {len(corrected_pages)} pages have training corrections")
    print(f"fine-tuned model: {folder}")


if __name__ == "__main__":
    main()
