"""``manage.py evaluate_retrieval --questions FILE``: retrieval quality and latency on gold questions,
beside a plain BM25 baseline over the same chunks computed in the same run. ``--split tune|heldout``
keeps one fixed half of the dialogues (as in ``evaluate_answers``): settings are chosen on ``tune``
and reported on ``heldout``.

The documents must be ingested first (``manage.py ingest <folder of the questions file>/docs``);
a chunk's file is its source path relative to the questions file's folder (``--docs-root``).
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from knowledge.evaluation import (
    BM25Baseline,
    RankedPassage,
    format_table,
    load_questions,
    run_retriever,
    score_rankings,
)
from knowledge.models import Chunk
from knowledge.selectors import chunk_search, conversation_search, retrieval_query


class Command(BaseCommand):
    help = "Evaluate hybrid retrieval (passage/document hit@k, MRR, latency) against a BM25 baseline."

    def add_arguments(self, parser):
        parser.add_argument("--questions", required=True, help="JSON-lines question file (Doc2Dial format)")
        parser.add_argument("--docs-root", default=None, help="folder gold_file paths are relative to "
                            "(default: the questions file's folder)")
        parser.add_argument("--collection", default=None)
        parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions")
        parser.add_argument("--modes", default="hybrid", help="comma-separated: hybrid,vector,text")
        parser.add_argument("--turns", choices=["first", "all", "both"], default="both",
                            help="first turns only, all turns (with history), or both tables")
        parser.add_argument("--split", choices=["tune", "heldout", "all"], default="all",
                            help="one fixed half of the dialogues (GoldQuestion.split): choose settings on "
                                 "tune, report on heldout")
        parser.add_argument("--history", default="adaptive",
                            help="comma-separated ways to use a question's history: adaptive (the pipeline's "
                                 "conversation_search: history only for follow-ups), always (question + earlier "
                                 "questions), never (the question alone); one column each")

    def handle(self, *args, questions, docs_root, collection, limit, modes, turns, history, split, **options):
        path = Path(questions)
        if not path.exists():
            raise CommandError(f"no such file: {questions}")
        root = Path(docs_root or path.parent).resolve()
        gold = load_questions(path, limit=limit)
        if split != "all":
            gold = [q for q in gold if q.split == split]
        chunks = Chunk.objects.select_related("source").only(
            "start", "end", "text", "heading_path", "source__uri", "source__title", "source__collection"
        )
        if collection:
            chunks = chunks.filter(source__collection=collection)
        passages = []
        relative: dict[str, str] = {}
        for chunk in chunks.iterator():
            uri = chunk.source.uri
            if uri not in relative:
                try:
                    relative[uri] = str(Path(uri).resolve().relative_to(root))
                except ValueError:
                    relative[uri] = uri
            context = " ".join([chunk.source.title, *chunk.heading_path])
            passages.append((relative[uri], chunk.start, chunk.end, f"{context}\n{chunk.text}"))
        gold_files = {q.gold_file for q in gold}
        if not gold_files & set(relative.values()):
            raise CommandError(
                f"none of the questions' gold files is ingested (looked for paths relative to {root}); "
                f"run: python manage.py ingest {root / 'docs'}"
            )
        self.stdout.write(f"{len(gold)} questions, {len(passages)} chunks from {len(relative)} sources\n")

        bm25 = BM25Baseline(passages)

        def query_of(question, use):
            if use == "never":
                return question.question
            if use == "adaptive":
                return conversation_search(question.question, question.history, k=1, collection=collection).query
            return retrieval_query(question.question, question.history)

        def hybrid_retriever(mode, use):
            def retrieve(question):
                if use == "adaptive":
                    results = conversation_search(question.question, question.history, k=10,
                                                  collection=collection, mode=mode).chunks
                else:
                    results = chunk_search(query_of(question, use), k=10, collection=collection, mode=mode)
                return [RankedPassage(relative.get(r.source_uri, r.source_uri), r.start, r.end) for r in results]
            return retrieve

        uses = history.split(",")
        unknown = set(uses) - {"adaptive", "always", "never"}
        if unknown:
            raise CommandError(f"unknown --history {sorted(unknown)}")
        systems = {}
        for use in uses:
            for mode in modes.split(","):
                systems[mode if len(uses) == 1 else f"{mode}, history {use}"] = hybrid_retriever(mode, use)
        # BM25 reads the same query as the first hybrid column.
        systems["BM25 baseline"] = lambda question: bm25.search(query_of(question, uses[0]), 10)
        chunk_search("warm up the embedding model", k=1, collection=collection)
        subsets = []
        if turns in ("first", "both"):
            subsets.append(("first turns", [q for q in gold if q.is_first_turn]))
        if turns in ("all", "both"):
            subsets.append(("all turns (with history)", gold))
        for label, subset in subsets:
            columns = {}
            for name, retrieve in systems.items():
                rankings, latencies = run_retriever(subset, retrieve)
                columns[name] = score_rankings(subset, rankings, latencies)
            self.stdout.write(f"\n### {label}\n\n{format_table(columns)}\n")
