"""Hybrid retrieval (``chunk_search``) on a small real subset of Doc2Dial, ingested once per module
into the real Postgres + pgvector with the real embedding model.

The subset: eight first-turn questions, two per domain, each self-contained (it names what it is
about; greetings such as "hello i would like to get information about new applicants" and
under-specified ones such as "What kind of documents are required to get a card?" are left out),
their eight gold pages, and one distractor page per domain chosen to be confusable with a gold page
(insurance requirements, another Social Security card page, loan repayment, VA careers): 12 pages.
A chunk "hits" a question when it comes from the gold page and overlaps ``[answer_start,
answer_end)`` (the data set's README).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from knowledge import services
from knowledge.models import Chunk, Source
from knowledge.selectors import RetrievedChunk, chunk_search, retrieval_query

COLLECTION = "doc2dial"
STORE = "store"
QUESTION_IDS = [
    "dea7174409afbfe0af0ace21e7f318ae_1",  # dmv: My insurance ended so what should i do
    "9f5633139a815b123df20367a37e9fc4_1",  # dmv: how do i pay dial in search account fees?
    "51a8a0969480057016df43b16eac206f_1",  # ssa: I need help with planning my Social Security survivor benefits.
    "db43edca626871c4eda7e6c5b2bae7d6_1",  # ssa: How do I apply for disability benefits?
    "d17e10d1d44e53046b773b3b44e697e3_1",  # studentaid: Do student loan deferments allow me to temporarily stop ...
    "fa81cc40772677c5cd2d0ae88b52aa83_1",  # studentaid: What is the feedback center for?
    "580b676d443abe322f001e327a7abd47_1",  # va: how do you Check your VA claim or appeal status
    "81bdd94d4add813d6f302b9dca698754_1",  # va: What can I do if I don't agree with a board decision?
]
DISTRACTORS = ["dmv/002_*", "ssa/053_*", "studentaid/225_*", "va/130_*"]


def pick_questions(questions: list[dict]) -> list[dict]:
    by_id = {question["qid"]: question for question in questions}
    return [by_id[qid] for qid in QUESTION_IDS]


def pick_files(doc2dial_dir: Path, chosen: list[dict]) -> list[Path]:
    gold = {doc2dial_dir / q["gold_file"] for q in chosen}
    distractors = {next((doc2dial_dir / "docs").glob(pattern)) for pattern in DISTRACTORS}
    return sorted(gold | distractors)


@pytest.fixture(scope="module")
def doc2dial_kb(django_db_setup, django_db_blocker, doc2dial_dir, doc2dial_questions, embedding_model,
                tmp_path_factory):
    """The subset ingested in collection "doc2dial", and one store page in collection "store"
    (committed for the module; deleted afterwards). Yields ``(chosen questions, files)``."""
    chosen = pick_questions(doc2dial_questions)
    files = pick_files(doc2dial_dir, chosen)
    store = tmp_path_factory.mktemp("store") / "returns.md"
    store.write_text(
        "# Returns\n\nYou can return a product bought in our store within 30 days. "
        "To check the status of your return, sign in and open Orders.\n"
    )
    with django_db_blocker.unblock():
        Source.objects.filter(collection__in=[COLLECTION, STORE]).delete()
        results = [
            services.document_ingest(source.pk)
            for paths, collection in [(files, COLLECTION), ([store], STORE)]
            for source in services.sources_register_paths(paths, collection=collection, enqueue=False).queued
        ]
        assert [r.status for r in results] == ["ingested"] * (len(files) + 1)
        try:
            yield chosen, files
        finally:
            Source.objects.filter(collection__in=[COLLECTION, STORE]).delete()


pytestmark = pytest.mark.django_db


def hits(result: RetrievedChunk, question: dict, doc2dial_dir: Path) -> bool:
    return (
        result.source_uri == str(doc2dial_dir / question["gold_file"])
        and result.start < question["answer_end"]
        and question["answer_start"] < result.end
    )


def test_the_subset_is_twelve_ready_pages_whose_text_holds_the_gold_answers(doc2dial_kb, doc2dial_dir):
    chosen, files = doc2dial_kb
    # then 8 questions and 12 pages were picked, and every page is ready
    assert (len(chosen), len(files)) == (8, 12)
    assert all(q["is_first_turn"] and q["history"] == [] for q in chosen)
    sources = Source.objects.filter(collection=COLLECTION)
    assert sorted(s.uri for s in sources) == sorted(str(f) for f in files)
    assert {s.status for s in sources} == {"ready"}
    # and each page's text is the file, so the data set's answer offsets point into it
    for question in chosen:
        source = sources.get(uri=str(doc2dial_dir / question["gold_file"]))
        span = source.text[question["answer_start"] : question["answer_end"]]
        assert span.strip() == question["reference_answer"].strip()


@pytest.mark.parametrize("index", range(len(QUESTION_IDS)))
def test_gold_passage_ranks_in_the_top_five_for_first_turn_questions(index, doc2dial_kb, doc2dial_dir):
    # given a first-turn question of the subset
    chosen, _ = doc2dial_kb
    question = chosen[index]
    # when it is retrieved in the Doc2Dial collection
    results = chunk_search(retrieval_query(question["question"]), k=5, collection=COLLECTION)
    # then a chunk of its gold passage is among the top five
    ranks = [rank for rank, result in enumerate(results, start=1) if hits(result, question, doc2dial_dir)]
    assert ranks, (question["question"], [(r.source_uri.rsplit("/", 1)[1], r.start, r.end) for r in results])


def test_results_carry_source_title_offsets_text_and_scores(doc2dial_kb, doc2dial_dir, embedding_model):
    # given the disability question
    chosen, _ = doc2dial_kb
    question = chosen[3]
    query = retrieval_query(question["question"])
    # when it is retrieved
    results = chunk_search(query, k=5, collection=COLLECTION)
    # then each result describes its chunk and source exactly, with the scores of the legs that found it
    assert len(results) == 5
    query_vector = embedding_model.encode([query])[0]
    for result in results:
        chunk = Chunk.objects.select_related("source").get(pk=result.chunk_id)
        source = chunk.source
        assert (result.source_id, result.source_uri, result.source_title, result.collection) == (
            source.pk, source.uri, source.title, COLLECTION)
        assert (result.ordinal, result.start, result.end, result.text, result.heading_path) == (
            chunk.ordinal, chunk.start, chunk.end, chunk.text, chunk.heading_path)
        assert source.text[result.start : result.end] == result.text
        assert source.title == Path(source.uri).read_text().strip().split("\n", 1)[0].strip()
        assert result.vector_rank is not None or result.text_rank_position is not None
        if result.vector_rank is None:
            assert result.vector_distance is None
        else:  # cosine distance, 0..2
            expected_distance = 1 - float(np.dot(query_vector, np.asarray(chunk.embedding)))
            assert result.vector_distance == pytest.approx(expected_distance, abs=1e-4)
        if result.text_rank_position is None:
            assert result.text_rank is None
        else:
            assert result.text_rank > 0
        legs = [rank for rank in (result.vector_rank, result.text_rank_position) if rank is not None]
        assert result.score == pytest.approx(sum(1 / (settings.RRF_K + rank) for rank in legs), rel=1e-12)
    # and the best result is from the gold page
    assert results[0].source_uri == str(doc2dial_dir / question["gold_file"])


def test_fused_ranking_is_reciprocal_rank_fusion_of_the_two_legs(doc2dial_kb, embedding_model):
    from fractions import Fraction

    # given a query, and each leg's ranking on its own
    query = "how do I pay the fees of a dial-in search account"
    vector = embedding_model.encode([query])[0]
    by_vector = chunk_search(query, k=50, collection=COLLECTION, query_embedding=vector, mode="vector")
    by_text = chunk_search(query, k=50, collection=COLLECTION, query_embedding=vector, mode="text")
    # then the vector leg is ordered by cosine distance and the full-text leg by its rank score
    assert [r.vector_rank for r in by_vector] == list(range(1, 51))
    assert all(r.text_rank_position is None for r in by_vector)
    distances = [r.vector_distance for r in by_vector]
    assert distances == sorted(distances)
    assert [r.text_rank_position for r in by_text] == list(range(1, len(by_text) + 1))
    assert all(r.vector_rank is None for r in by_text)
    text_scores = [r.text_rank for r in by_text]
    assert len(by_text) > 5 and text_scores == sorted(text_scores, reverse=True)
    # when the hybrid search runs
    hybrid = chunk_search(query, k=20, collection=COLLECTION, query_embedding=vector)
    # then its order is the RRF order of the legs' ranks (score descending, chunk id ascending)
    vector_ranks = {r.chunk_id: r.vector_rank for r in by_vector}
    text_ranks = {r.chunk_id: r.text_rank_position for r in by_text}

    def fused(chunk_id: int) -> Fraction:
        return sum((Fraction(1, settings.RRF_K + ranks[chunk_id]) for ranks in (vector_ranks, text_ranks)
                    if chunk_id in ranks), Fraction(0))

    expected = sorted(set(vector_ranks) | set(text_ranks), key=lambda chunk_id: (-fused(chunk_id), chunk_id))[:20]
    assert [r.chunk_id for r in hybrid] == expected
    for result in hybrid:
        assert (result.vector_rank, result.text_rank_position) == (
            vector_ranks.get(result.chunk_id), text_ranks.get(result.chunk_id))
        assert result.score == pytest.approx(float(fused(result.chunk_id)), rel=1e-12)
    scores = [r.score for r in hybrid]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] <= 2 / (settings.RRF_K + 1)


def test_collection_filter_restricts_results_to_one_collection(doc2dial_kb):
    # given the Doc2Dial pages in one collection and a store's returns page in another
    query = "return a product bought in our store within 30 days"
    # when searching the store collection, then only its chunk is returned
    store = chunk_search(query, k=5, collection=STORE)
    assert [(r.collection, r.source_title, r.text[:34]) for r in store] == [
        (STORE, "Returns", "You can return a product bought in")]
    # when searching Doc2Dial, then no store chunk is returned
    doc2dial = chunk_search(query, k=5, collection=COLLECTION)
    assert len(doc2dial) == 5 and {r.collection for r in doc2dial} == {COLLECTION}
    # when searching every collection, then the store page ranks first and Doc2Dial pages follow
    everything = chunk_search(query, k=5)
    assert [r.collection for r in everything] == [STORE] + [COLLECTION] * 4
    # and an unknown collection has no results
    assert chunk_search(query, k=5, collection="no-such-collection") == []


def test_the_full_text_leg_weighs_a_rare_word_of_the_query_above_a_common_one(
        django_db_blocker, embedding_model, tmp_path):
    import math

    from django.db import connection

    # given four pages that all talk about shipping, one of them also naming Canada once
    pages = {
        "warehouse.md": "# Warehouse\n\nWe ship from Portland. Every order we ship leaves the Portland warehouse.",
        "rates.md": "# Rates\n\nWe ship standard or express. Shipping is free over 75 dollars when we ship standard.",
        "freight.md": "# Freight\n\nKayaks ship by freight. Freight orders ship within a week.",
        "international.md": "# International\n\nWe ship to Canada and the United Kingdom.",
    }
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    collection = "rare-words"
    with django_db_blocker.unblock():
        Source.objects.filter(collection=collection).delete()
        for source in services.sources_register_paths(sorted(tmp_path.iterdir()), collection=collection,
                                                      enqueue=False).queued:
            assert services.document_ingest(source.pk).status == "ingested"
        try:
            # when the full-text leg alone ranks "Do you ship to Canada?"
            results = chunk_search("Do you ship to Canada?", k=4, collection=collection, mode="text")
            # then the page naming Canada comes first, although the others say "ship" more often
            assert [Path(r.source_uri).name for r in results][0] == "international.md"
            assert len(results) == 4
            # and each score is the sum over the query's lexemes of BM25's idf (4 chunks: "ship" in 4,
            # "canada" in 1) times Postgres' ts_rank of that lexeme alone
            idf = {"ship": math.log(1 + 0.5 / 4.5), "canada": math.log(1 + 3.5 / 1.5)}
            with connection.cursor() as cursor:
                for result in results:
                    cursor.execute("SELECT ts_rank(search_vector, 'ship'::tsquery), "
                                   "ts_rank(search_vector, 'canada'::tsquery) FROM knowledge_chunk WHERE id = %s",
                                   [result.chunk_id])
                    ship, canada = cursor.fetchone()
                    assert result.text_rank == pytest.approx(idf["ship"] * ship + idf["canada"] * canada, rel=1e-5)
        finally:
            Source.objects.filter(collection=collection).delete()


def test_the_full_text_leg_ranks_only_the_matches_of_the_rarest_words_within_its_budget(
        django_db_blocker, embedding_model, tmp_path, settings):
    # given five pages about shipping, one of which also names Canada
    pages = {f"ship{n}.md": f"# Shipping {n}\n\nWe ship order {n} from Portland." for n in range(4)}
    pages["international.md"] = "# International\n\nWe ship to Canada and the United Kingdom."
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    collection = "text-budget"
    with django_db_blocker.unblock():
        Source.objects.filter(collection=collection).delete()
        for source in services.sources_register_paths(sorted(tmp_path.iterdir()), collection=collection,
                                                      enqueue=False).queued:
            assert services.document_ingest(source.pk).status == "ingested"
        try:
            # when the budget admits every match, the full-text leg ranks all five pages
            settings.RETRIEVAL_TEXT_MAX_MATCHES = 100
            results = chunk_search("Do you ship to Canada?", k=5, collection=collection, mode="text")
            assert [Path(r.source_uri).name for r in results][0] == "international.md"
            assert len(results) == 5
            # when it admits 3 matches: "canada" (1 chunk) finds the candidates, "ship" (5 more) does
            # not, so only the page naming Canada is ranked
            settings.RETRIEVAL_TEXT_MAX_MATCHES = 3
            results = chunk_search("Do you ship to Canada?", k=5, collection=collection, mode="text")
            assert [Path(r.source_uri).name for r in results] == ["international.md"]
            # and it is still scored by both words: more than "canada"'s term alone (5 chunks, 1 with it)
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT ts_rank(search_vector, 'canada'::tsquery) FROM knowledge_chunk WHERE id = %s",
                               [results[0].chunk_id])
                canada_alone = math.log(1 + 4.5 / 1.5) * cursor.fetchone()[0]
            assert results[0].text_rank > canada_alone * 1.01
            # a query of common words only keeps its rarest word, and ranks at most the budget's matches
            results = chunk_search("Do you ship?", k=5, collection=collection, mode="text")
            assert len(results) == 3
            assert all("ship" in r.text.lower() for r in results)
        finally:
            Source.objects.filter(collection=collection).delete()


def test_the_full_text_leg_reads_document_frequencies_that_follow_ingestion_and_deletion(
        django_db_blocker, embedding_model, tmp_path):
    from django.db import connection

    from knowledge.models import LexemeFrequency

    def stored(collection):
        return dict(LexemeFrequency.objects.filter(collection=collection).values_list("lexeme", "document_frequency"))

    def counted(collection, lexeme):
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM knowledge_chunk WHERE collection = %s AND search_vector @@ %s::tsquery",
                           [collection, lexeme])
            return cursor.fetchone()[0]

    # given five pages about shipping, one of which also names Canada
    pages = {f"ship{n}.md": f"# Shipping {n}\n\nWe ship order {n} from Portland." for n in range(4)}
    pages["international.md"] = "# International\n\nWe ship to Canada and the United Kingdom."
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
    collection = "lexeme-frequencies"
    with django_db_blocker.unblock():
        Source.objects.filter(collection=collection).delete()
        LexemeFrequency.objects.filter(collection=collection).delete()
        for source in services.sources_register_paths(sorted(tmp_path.iterdir()), collection=collection,
                                                      enqueue=False).queued:
            assert services.document_ingest(source.pk).status == "ingested"
        try:
            # then every lexeme's stored document frequency is the number of the collection's chunks holding it
            frequencies = stored(collection)
            assert frequencies["ship"] == 5 and frequencies["canada"] == 1 and frequencies["portland"] == 4
            assert all(counted(collection, lexeme) == df for lexeme, df in frequencies.items())
            # and the full-text leg ranks exactly as when it counts every word itself (no stored figures)
            with_stored = chunk_search("Do you ship to Canada from Portland?", k=5, collection=collection, mode="text")
            LexemeFrequency.objects.filter(collection=collection).delete()
            with_counts = chunk_search("Do you ship to Canada from Portland?", k=5, collection=collection, mode="text")
            assert [(r.chunk_id, round(r.text_rank, 6)) for r in with_stored] == [
                (r.chunk_id, round(r.text_rank, 6)) for r in with_counts]
            assert Path(with_stored[0].source_uri).name == "international.md"
            # when the Canada page is re-ingested without Canada, the word leaves the figures
            (tmp_path / "international.md").write_text("# International\n\nWe ship to the United Kingdom.")
            source, = services.sources_register_paths([tmp_path / "international.md"], collection=collection,
                                                      enqueue=False).queued
            assert services.document_ingest(source.pk).status == "ingested"
            assert "canada" not in stored(collection) and stored(collection)["ship"] == 5
            # when a page is deleted, its words are counted out
            services.source_delete(Source.objects.get(collection=collection, uri__endswith="ship0.md"))
            assert stored(collection)["ship"] == 4 and stored(collection)["portland"] == 3
            # and the batch path keeps them too
            (tmp_path / "ship0.md").write_text("# Shipping 0\n\nWe ship kayaks from Portland.")
            added = services.sources_register_paths([tmp_path / "ship0.md"], collection=collection, enqueue=False).queued
            assert [r.status for r in services.documents_ingest([s.pk for s in added])] == ["ingested"]
            assert stored(collection)["kayak"] == 1 and stored(collection)["ship"] == 5
            # and a bulk delete counts every deleted page out, refreshing the collection once
            from knowledge.services import sources as sources_module

            refreshed = []
            real_refresh = sources_module.lexeme_frequencies_refresh
            sources_module.lexeme_frequencies_refresh = lambda collections: refreshed.append(list(collections)) or \
                real_refresh(collections)
            try:
                deleted = services.sources_delete(Source.objects.filter(collection=collection, uri__contains="/ship"))
            finally:
                sources_module.lexeme_frequencies_refresh = real_refresh
            assert deleted == 4 and refreshed == [[collection]]
            assert stored(collection)["ship"] == 1 and "portland" not in stored(collection)
        finally:
            Source.objects.filter(collection=collection).delete()
            LexemeFrequency.objects.filter(collection=collection).delete()


def test_a_chunk_always_carries_its_sources_collection(django_db_blocker, embedding_model, tmp_path):
    from django.db import connection

    # given a page ingested into one collection
    (tmp_path / "kayaks.md").write_text("# Kayaks\n\nKayak rentals start at the harbour shop.")
    with django_db_blocker.unblock():
        Source.objects.filter(collection__in=["moved-from", "moved-to"]).delete()
        source, = services.sources_register_paths([tmp_path / "kayaks.md"], collection="moved-from",
                                                  enqueue=False).queued
        assert services.document_ingest(source.pk).status == "ingested"
        try:
            # then its chunks carry that collection, whatever the inserting code wrote
            assert set(Chunk.objects.filter(source=source).values_list("collection", flat=True)) == {"moved-from"}
            with connection.cursor() as cursor:
                cursor.execute("UPDATE knowledge_chunk SET collection = 'elsewhere' WHERE source_id = %s", [source.pk])
            assert set(Chunk.objects.filter(source=source).values_list("collection", flat=True)) == {"moved-from"}
            # when an admin moves the source to another collection, its chunks follow, and retrieval finds
            # them there only
            source.refresh_from_db()
            source.collection = "moved-to"
            source.save()
            assert set(Chunk.objects.filter(source=source).values_list("collection", flat=True)) == {"moved-to"}
            assert [r.source_id for r in chunk_search("kayak rentals", k=3, collection="moved-to")] == [source.pk]
            assert chunk_search("kayak rentals", k=3, collection="moved-from") == []
        finally:
            Source.objects.filter(collection__in=["moved-from", "moved-to"]).delete()


def test_chunk_search_argument_errors_and_empty_query(doc2dial_kb):
    assert chunk_search("   ", k=5) == []
    with pytest.raises(ValueError, match="k must be at least 1"):
        chunk_search("disability", k=0)
    with pytest.raises(ValueError, match="unknown retrieval mode 'bm25'"):
        chunk_search("disability", k=5, mode="bm25")


def test_punctuation_only_query_uses_the_vector_leg_alone(doc2dial_kb):
    # given a query with no full-text terms
    results = chunk_search("???", k=3, collection=COLLECTION)
    # then results come from the vector leg only
    assert len(results) == 3
    assert all(r.text_rank_position is None and r.vector_rank == n for n, r in enumerate(results, start=1))


def test_retrieval_query_appends_the_latest_earlier_user_turns_after_the_question():
    history = [
        {"role": "user", "text": "I want to apply for disability benefits"},
        {"role": "agent", "text": "You can apply online."},
        {"role": "user", "text": "I was injured at work"},
        {"role": "agent", "text": "I am sorry to hear that."},
        {"role": "user", "text": "It was last year"},
    ]
    assert retrieval_query(" What about my spouse? ", history) == (
        "What about my spouse?\nIt was last year\nI was injured at work")
    assert retrieval_query("What about my spouse?") == "What about my spouse?"


@pytest.mark.parametrize("question, follow_up", [
    ("What about my spouse?", True),
    ("How do I renew it?", True),
    ("And for a motorcycle?", True),
    ("Yes, I have the form.", True),
    ("ok", True),
    ("What is the capital of France?", False),
    ("How do I renew my driver license online?", False),
    ("Do you ship to Canada?", False),
])
def test_is_follow_up_spots_questions_that_lean_on_the_conversation(question, follow_up):
    from knowledge.selectors import is_follow_up

    assert is_follow_up(question) is follow_up
