"""Knowledge-base reads: hybrid retrieval (``chunk_search``), the retrieval query (``retrieval_query``)
and curated answers (``curated_answer_match``, ``curated_answer_list``, ``curated_question_vectors``).

Hybrid retrieval runs two legs in one SQL statement and fuses their rankings with reciprocal rank
fusion (RRF; Cormack, Clarke & Buettcher, "Reciprocal Rank Fusion outperforms Condorcet and
individual Rank Learning Methods", SIGIR 2009): ``score = sum(1 / (RRF_K + rank))`` over the legs
that returned the chunk.

- vector leg: cosine distance between the query embedding and chunk embeddings (pgvector HNSW
  index, ``<=>``), restricted to chunks of the active embedding version (or, for the promotion gate,
  a candidate version's shadow vectors: ``knowledge.services.embedding_versions``);
- full-text leg: Postgres ``english`` full-text search, any query term (OR), ranked by the sum over
  the query's lexemes of ``idf * ts_rank`` (title and headings weighted A, passage B), with BM25's
  inverse document frequency ``ln(1 + (N - df + 0.5) / (df + 0.5))`` (Robertson & Zaragoza, "The
  Probabilistic Relevance Framework: BM25 and Beyond", 2009) counted in the collection at query
  time: a rare word of the question ("Canada") outweighs a common one ("ship"), which
  ``ts_rank_cd`` alone weighs the same. Measured on Doc2Dial first turns (tune / held-out halves;
  README, "Retrieval"): full-text passage-hit@5 0.478 / 0.516 -> 0.603 / 0.632, hybrid 0.603 /
  0.626 -> 0.668 / 0.639, document-hit@5 0.853 / 0.839 -> 0.875 / 0.897.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from django.conf import settings
from django.db import connection, transaction

from knowledge import embedding as embedding_module
from knowledge.models import Chunk, ChunkEmbedding, CuratedAnswer, EmbeddingModelVersion, Source

_TERM = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass(frozen=True)
class RetrievedChunk:
    """One retrieval result.

    ``start``/``end`` are character offsets into the source's text; ``score`` is the fused RRF score
    (higher is better, at most ``2 / (RRF_K + 1)``); ``vector_distance`` is the cosine distance (0..2,
    lower is closer) when the vector leg returned the chunk, ``text_rank`` the full-text leg's score
    (``sum(idf * ts_rank)`` over the query's lexemes, see the module docstring) when it did;
    ``vector_rank``/``text_rank_position`` are 1-based ranks in each leg.
    """

    chunk_id: int
    source_id: int
    source_uri: str
    source_title: str
    collection: str
    ordinal: int
    start: int
    end: int
    text: str
    heading_path: list[str] = field(default_factory=list)
    score: float = 0.0
    vector_rank: int | None = None
    vector_distance: float | None = None
    text_rank_position: int | None = None
    text_rank: float | None = None


def retrieval_query(question: str, history: Sequence[dict] = (), *, max_user_turns: int = 2) -> str:
    """The text to retrieve with for ``question`` in a conversation.

    ``history`` is the earlier turns, oldest first, as ``{"role": "user"|"agent"|"assistant",
    "text": str}``. A follow-up ("what about for my spouse?") rarely names its topic, so the latest
    ``max_user_turns`` earlier user turns are appended after the question (question first, so it
    dominates the embedding's attention and the full-text terms).
    """
    earlier = [turn["text"] for turn in history if turn.get("role") == "user" and turn.get("text")]
    parts = [question.strip(), *reversed(earlier[-max_user_turns:])] if max_user_turns else [question.strip()]
    return "\n".join(part for part in parts if part)


# Words that point back at something said earlier ("how do I renew it?", "what about my spouse?").
_ANAPHORA = re.compile(
    r"(?i)\b(it|its|this|that one|these|those|they|them|their|he|she|him|his|her|same|such|else|instead|either)\b"
    r"|^\s*(and|also|so|ok(ay)?|what about|how about|what if|and if|then|but|yes|yeah|no|nope|right|sure|great|"
    r"thanks|thank you|of|for|about|with|i (have|do|did|am|was|will))\b"
)
_FUNCTION_WORDS = frozenset(
    "a an and are as at be but by can could do does for from how i if in is it me my of on or should so than the "
    "then there to was what when where which who why will with would you your yes no ok okay please thanks thank "
    "hi hello about get need want know tell explain explained process thing things everything anything more "
    "question questions information info help yet also one located sure right".split()
)


def is_follow_up(question: str, *, min_terms: int = 2) -> bool:
    """Whether ``question`` leans on the conversation to be understood: it refers back (a pronoun such
    as "it" or "they", or opens with "and", "what about", "what if"...) or has fewer than
    ``min_terms`` content words. Such questions are retrieved together with their history."""
    terms = [t for t in _TERM.findall(question.lower()) if t not in _FUNCTION_WORDS and len(t) > 1]
    return len(terms) < min_terms or bool(_ANAPHORA.search(question))


# ConversationalRetrieval.follow_up when a question that stands on its own was retrieved with its own
# chunks first and its history's after them.
OWN_WORDS_FIRST = "own words first"


@dataclass(frozen=True)
class ConversationalRetrieval:
    """The outcome of ``conversation_search``: ``chunks`` (best first), ``query`` (the text they were
    retrieved with), ``follow_up`` (``None`` when the question was retrieved on its own words, else why
    its history was used: ``"refers back"`` or ``"weak on its own"``), ``question_distance`` (the
    closest chunk's cosine distance, 0..2, for the question's own words; ``None`` if nothing), and
    ``distance`` (the same for ``chunks``). ``follow_up`` is ``OWN_WORDS_FIRST`` when the question
    stands on its own but the history's results were fused after its own (``chunks``; ``distance`` is
    then the question's own). ``abstain_distance`` is the abstention threshold (cosine, 0..2) that
    fits these distances: the searched (active) version's own, else ``ABSTAIN_MAX_DISTANCE``; the
    pipeline declines when ``distance`` is above it. ``model_id`` is the embedding version searched."""

    chunks: list[RetrievedChunk]
    query: str
    follow_up: str | None
    question_distance: float | None
    distance: float | None
    abstain_distance: float | None = None
    model_id: str | None = None

    @property
    def reads_history(self) -> bool:
        """Whether the question is read together with its history (it refers back, or was weak on its
        own), so what answers it is judged against the question with its history."""
        return self.follow_up is not None and self.follow_up != OWN_WORDS_FIRST


def _closest(chunks: Sequence[RetrievedChunk]) -> float | None:
    distances = [c.vector_distance for c in chunks if c.vector_distance is not None]
    return min(distances) if distances else None


def _content_terms(question: str) -> set[str]:
    return {t for t in _TERM.findall(question.lower()) if t not in _FUNCTION_WORDS and len(t) > 2}


def _shares_terms(question: str, chunks: Sequence[RetrievedChunk]) -> bool:
    """Whether one of ``question``'s content words occurs in ``chunks`` (their title or text): a
    question that leans on its history must still touch the history's topic."""
    terms = _content_terms(question)
    text = " ".join(f"{c.source_title} {c.text}" for c in chunks).lower()
    found = set(_TERM.findall(text))
    return any(term in found or term.rstrip("s") in found for term in terms)


def _own_words_lead(own_distance: float | None, history_distance: float | None, *, weak: float,
                    margin: float) -> bool:
    """Whether a question that refers back is still led by its own words: they retrieve well (their
    closest chunk within ``weak``, cosine distance 0..2) and either the question read with its history
    retrieves weakly (nothing, or farther than ``weak``: "And how long does a refund take?" after
    questions about a tent) or its own closest chunk is at least ``margin`` closer than the history's
    ("Can I cancel my order after I placed it?": the pronoun points inside the question; a negative
    ``margin`` turns this second case off)."""
    if own_distance is None or own_distance > weak:
        return False
    if history_distance is None or history_distance > weak:
        return True
    return margin >= 0 and history_distance - own_distance >= margin


def conversation_search(
    question: str, history: Sequence[dict] = (), *, k: int = 5, collection: str | None = None,
    mode: str = "hybrid", weak_distance: float | None = None, lean_max_distance: float | None = None,
    question_embedding: Sequence[float] | None = None, exclude_kinds: Sequence[str] = (),
    own_margin: float | None = None,
) -> ConversationalRetrieval:
    """Retrieval that follows a conversation without being captured by it.

    The question is retrieved on its own words and, when there is ``history`` (``[{"role", "text"}]``,
    oldest first), also with it (``retrieval_query``; both queries embedded in one batch). The
    history's results are used when the question refers back (``is_follow_up``), or when its own
    retrieval is weak (closest chunk farther than ``weak_distance``, default ``ABSTAIN_MAX_DISTANCE``)
    but not hopeless (within ``lean_max_distance``, default ``FOLLOW_UP_MAX_DISTANCE``), the
    history's retrieval is not weak and its best chunks contain one of the question's content words.
    A question that refers back is still led by its own words when they retrieve well and either the
    history's retrieval is weak ("And how long does a refund take?" after questions about a tent) or
    its own closest chunk is at least ``own_margin`` (cosine distance, default the active version's
    ``ActiveEmbedding.own_margin``: ``FOLLOW_UP_OWN_MARGIN`` unless the embedder gate fitted its own;
    negative: never) closer than the history's ("Can I cancel my order
    after I placed it?": the pronoun points inside the question).
    Otherwise the question leads on its own words: when they retrieve well its own results come first
    and the history's are fused after them (``OWN_WORDS_FIRST``), so a new topic is answered from its
    own sources; when they do not, only its own (far) results are returned, for the caller's
    abstention check. ``question_embedding`` (unit vector of length ``EMBEDDING_DIM``) is the
    question's own embedding when the caller already has it. ``exclude_kinds`` as in ``chunk_search``.

    Both searches and the thresholds are read in one REPEATABLE READ snapshot (``_search_snapshot``),
    so a promotion of the embedding model between them cannot fuse an old and a new ranking, nor judge
    new distances by the old version's threshold: ``weak_distance`` / ``lean_max_distance`` default to
    the active version's fitted thresholds (``ActiveEmbedding.abstain_distance`` /
    ``follow_up_distance``: ``ABSTAIN_MAX_DISTANCE`` / ``FOLLOW_UP_MAX_DISTANCE`` unless the embedder
    gate fitted its own), returned as ``abstain_distance``.
    Returns ``ConversationalRetrieval``; raises ``ValueError`` like ``chunk_search``.
    """
    question = question.strip()
    if not question:
        return ConversationalRetrieval([], "", None, None, None,
                                       settings.ABSTAIN_MAX_DISTANCE if weak_distance is None else weak_distance)
    query = retrieval_query(question, history)
    if question_embedding is not None:
        vectors = [question_embedding]
        if query != question:
            vectors.append(embedding_module.get_embedding_model().encode([query])[0])
    else:
        texts = [question] if query == question else [question, query]
        vectors = embedding_module.get_embedding_model().encode(texts)
    with _search_snapshot():
        active = embedding_module.active_embedding()
        weak = active.abstain_distance if weak_distance is None else weak_distance
        lean = active.follow_up_distance if lean_max_distance is None else lean_max_distance
        margin = active.own_margin if own_margin is None else own_margin
        own = chunk_search(question, k=k, collection=collection, query_embedding=vectors[0], mode=mode,
                           exclude_kinds=exclude_kinds)
        with_history = None if query == question else chunk_search(
            query, k=k, collection=collection, query_embedding=vectors[1], mode=mode, exclude_kinds=exclude_kinds)

    def result(chunks, used_query, follow_up, distance) -> ConversationalRetrieval:
        return ConversationalRetrieval(chunks, used_query, follow_up, own_distance, distance, weak, active.model_id)

    own_distance = _closest(own)
    if with_history is None:
        return result(own, question, None, own_distance)
    history_distance = _closest(with_history)
    reason = None
    if is_follow_up(question):
        # Measured: also requiring an elliptical question far from everything on its own to touch the
        # history's chunks declined 9 more of 300 real Doc2Dial follow-ups to catch 45 of 50 unrelated
        # questions written as "And ...?"; real follow-ups won.
        reason = "refers back"
    elif (own_distance is not None and weak < own_distance <= lean and history_distance is not None
          and history_distance <= weak and _shares_terms(question, with_history[:3])):
        reason = "weak on its own"
    if reason and not _own_words_lead(own_distance, history_distance, weak=weak, margin=margin):
        return result(with_history, query, reason, history_distance)
    if own_distance is not None and own_distance <= weak:
        # (Also a question that refers back whose own words lead, ``_own_words_lead``.)
        # On topic on its own words: its own chunks lead and the history's join them by RRF, so a
        # follow-up that names no topic without referring back ("What documents do I need?") still
        # finds its page (Doc2Dial all turns, 700 questions: document-hit@5 0.731 -> 0.766), while
        # abstention keeps judging the question's own distance.
        return result(_rrf_fuse([own, with_history], k), query, OWN_WORDS_FIRST, own_distance)
    return result(own, question, None, own_distance)


@contextmanager
def _search_snapshot() -> Iterator[None]:
    """A transaction whose reads share one snapshot: outermost, REPEATABLE READ, after taking the chunk
    table's share lock (before the snapshot: a promotion that rebuilds the column for another
    dimension holds ACCESS EXCLUSIVE until it commits, and a snapshot taken before that would see the
    rewritten table empty). Inside a caller's transaction it is a savepoint and the caller's snapshot
    rules (e.g. ``conversation_search`` holding one for both of its ``chunk_search`` calls)."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor.execute("LOCK TABLE knowledge_chunk IN ACCESS SHARE MODE")
        yield


def _rrf_fuse(rankings: Sequence[Sequence[RetrievedChunk]], k: int) -> list[RetrievedChunk]:
    """The ``k`` best chunks of several rankings fused with reciprocal rank fusion (``RRF_K``); ties
    keep the earlier ranking's order."""
    scores: dict[int, float] = {}
    first: dict[int, tuple[int, int, RetrievedChunk]] = {}
    for which, ranking in enumerate(rankings):
        for rank, chunk in enumerate(ranking, start=1):
            scores[chunk.chunk_id] = scores.get(chunk.chunk_id, 0.0) + 1.0 / (settings.RRF_K + rank)
            first.setdefault(chunk.chunk_id, (which, rank, chunk))
    ordered = sorted(scores, key=lambda cid: (-scores[cid], first[cid][0], first[cid][1]))
    return [first[cid][2] for cid in ordered[:k]]


def _query_words(query: str) -> list[str]:
    """The query's words, lower case, each once, in order."""
    return list(dict.fromkeys(term.lower() for term in _TERM.findall(query)))


def _tsquery_text(query: str) -> str:
    """An OR ``to_tsquery`` expression of the query's words (quoted, so no operator can be injected)."""
    return " | ".join(f"'{term}'" for term in _query_words(query))


# The vector leg over the active version's vectors (``Chunk.embedding``, its HNSW index) ...
_ACTIVE_VECTOR_LEG = """SELECT c.id, c.embedding <=> %(embedding)s::vector AS distance
        FROM knowledge_chunk c
        {vector_join}
        WHERE c.embedding_model = %(model)s {vector_filter}
        ORDER BY c.embedding <=> %(embedding)s::vector"""
# ... and over another version's shadow vectors (``ChunkEmbedding``; the partial expression HNSW index
# of that version and dimension, whose predicate and expression the literal id and dimension match).
_SHADOW_VECTOR_LEG = """SELECT c.id, e.embedding::vector({dimension}) <=> %(embedding)s::vector({dimension}) AS distance
        FROM knowledge_chunkembedding e
        JOIN knowledge_chunk c ON c.id = e.chunk_id
        {vector_join}
        WHERE e.version_id = {version_id} {vector_filter}
        ORDER BY e.embedding::vector({dimension}) <=> %(embedding)s::vector({dimension})"""

_HYBRID_SQL = """
WITH vec AS (
    SELECT id, distance, row_number() OVER (ORDER BY distance, id) AS rank
    FROM (
        {vector_leg}
        LIMIT %(candidates)s
    ) nearest
),
lexemes AS MATERIALIZED (
    -- the query's lexemes and how many searched chunks hold each: the collection's stored document
    -- frequency (known), else counted up to max_matches + 1 (a GIN lookup, stopped early for a
    -- common word; the subquery runs only where coalesce reaches it)
    SELECT q.lexeme, q.query, f.document_frequency IS NOT NULL AS known,
           coalesce(f.document_frequency, (SELECT count(*) FROM (SELECT 1 FROM knowledge_chunk c {text_join}
                    WHERE c.search_vector @@ q.query {text_filter} LIMIT %(max_matches)s + 1) held)) AS df
    FROM (SELECT v.lexeme, quote_literal(v.lexeme)::tsquery AS query
          FROM unnest(to_tsvector('english', %(terms)s)) v) q
    LEFT JOIN knowledge_lexemefrequency f ON f.collection = %(collection)s AND f.lexeme = q.lexeme
),
common AS MATERIALIZED (
    -- the share of chunks holding each of the table's most common lexemes (ANALYZE's sample), to
    -- estimate the document frequency of a word too common to count
    SELECT e.lexeme, e.share
    FROM pg_stats p,
         unnest(p.most_common_elems::text::text[], p.most_common_elem_freqs) AS e(lexeme, share)
    WHERE p.schemaname = current_schema() AND p.tablename = 'knowledge_chunk' AND p.attname = 'search_vector'
      AND e.lexeme IS NOT NULL
),
terms AS MATERIALIZED (
    -- BM25's inverse document frequency of every lexeme (a count capped at max_matches is replaced by
    -- the estimate from the table's statistics when that is larger), and which lexemes find the
    -- candidates: the rarest, kept while the chunks they match add up to at most max_matches (the
    -- rarest always), so the ranked set is bounded whatever the corpus size
    SELECT query, idf, rarity = 1 OR matched <= %(max_matches)s AS finds FROM (
        SELECT l.query, ln(1 + greatest(n.total - d.df + 0.5, 0.5) / (d.df + 0.5)) AS idf,
               sum(l.df) OVER rarest AS matched, row_number() OVER rarest AS rarity
        FROM lexemes l
        CROSS JOIN (SELECT coalesce(sum(s.chunk_count), 0) AS total FROM knowledge_source s
                    WHERE true {source_filter}) n
        LEFT JOIN common ON common.lexeme = l.lexeme
        CROSS JOIN LATERAL (SELECT CASE WHEN NOT l.known AND l.df > %(max_matches)s
                                        THEN greatest(l.df, coalesce(common.share, 0) * n.total)
                                        ELSE l.df END AS df) d
        WHERE l.df > 0
        WINDOW rarest AS (ORDER BY l.df, l.query::text ROWS UNBOUNDED PRECEDING)
    ) ranked
),
fts AS (
    SELECT id, text_score, row_number() OVER (ORDER BY text_score DESC, id) AS rank
    FROM (
        -- the candidates, found by the rarest lexemes, scored by all of them
        SELECT held.id, sum(terms.idf * ts_rank(held.search_vector, terms.query)) AS text_score
        FROM (SELECT DISTINCT ON (found.id) found.id, found.search_vector
              FROM terms finder
              CROSS JOIN LATERAL (SELECT c.id, c.search_vector FROM knowledge_chunk c {text_join}
                                  WHERE c.search_vector @@ finder.query {text_filter}
                                  LIMIT %(max_matches)s) found
              WHERE finder.finds) held
        JOIN terms ON held.search_vector @@ terms.query
        GROUP BY held.id
        ORDER BY text_score DESC, held.id
        LIMIT %(candidates)s
    ) matched
)
SELECT coalesce(vec.id, fts.id) AS id,
       vec.rank, vec.distance, fts.rank, fts.text_score,
       coalesce(1.0 / (%(rrf_k)s + vec.rank), 0) + coalesce(1.0 / (%(rrf_k)s + fts.rank), 0) AS score
FROM vec FULL OUTER JOIN fts ON vec.id = fts.id
ORDER BY score DESC, id
LIMIT %(k)s
"""


def chunk_search(
    query: str,
    *,
    k: int = 5,
    collection: str | None = None,
    candidates: int | None = None,
    query_embedding: Sequence[float] | None = None,
    mode: str = "hybrid",
    exclude_kinds: Sequence[str] = (),
    embedding_version: int | None = None,
) -> list[RetrievedChunk]:
    """Hybrid retrieval: the ``k`` best chunks for ``query`` (best first), fused with RRF.

    The vector leg is the nearest chunks by cosine distance (HNSW). The full-text leg scores a chunk by
    BM25-style weighting: the sum over the query's lexemes of their inverse document frequency in the
    searched chunks times ``ts_rank``; to bound its cost at any corpus size it ranks only the chunks
    found by the query's rarest lexemes (kept while their matches add up to at most
    ``RETRIEVAL_TEXT_MAX_MATCHES``). A lexeme's document frequency is the collection's stored one
    (``LexemeFrequency``, kept by ingestion and deletion); a lexeme it does not hold (or any, without
    ``collection``) is counted up to that budget, and one too common to count gets the table's
    statistics' estimate (``pg_stats``; the larger of that and the count).

    The vector leg reads the active embedding version (``knowledge.embedding.active_embedding``), read
    in the same REPEATABLE READ snapshot as the chunks (taken after the chunk table's lock, so a
    promotion that changes the column's dimension is waited for): a search during a promotion sees the
    old version or the new one, never a mix. ``embedding_version`` (an ``EmbeddingModelVersion`` id)
    searches that version's vectors instead (a candidate's shadow vectors, for the promotion gate), with
    the same full-text leg and fusion; the active version's id is the same as ``None``.

    ``collection`` restricts the search to one collection. ``candidates`` (default
    ``RETRIEVAL_CANDIDATES``) is how many chunks each leg contributes before fusion.
    ``query_embedding`` (a unit vector of the searched version's dimension) skips embedding the query;
    an ``EncodedVectors`` row made by another version's encoder (a promotion since) is not used: the
    query is embedded again by the searched version's encoder.
    ``mode`` ``"vector"`` or ``"text"`` runs one leg only (for measurement). ``exclude_kinds``
    (``Source.Kind`` values) leaves those sources out, e.g. ``("curated",)`` where approved
    corrections' answers must not count (the tuning evaluation: a held-out correction's own answer).
    Returns ``[]`` for an empty query. Raises ``ValueError`` if ``k`` < 1 or ``mode`` is unknown,
    ``EmbeddingModelVersion.DoesNotExist`` for an unknown ``embedding_version``.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if mode not in {"hybrid", "vector", "text"}:
        raise ValueError(f"unknown retrieval mode {mode!r}")
    if not query.strip():
        return []
    candidates = max(candidates or settings.RETRIEVAL_CANDIDATES, k)
    tsquery = _tsquery_text(query)
    # A chunk carries its source's collection (kept equal by triggers), so the collection is filtered
    # inside the (collection, search_vector) GIN index; only excluded kinds need the source row.
    join = "JOIN knowledge_source s ON s.id = c.source_id" if exclude_kinds else ""
    kinds = " AND s.kind <> ALL(%(exclude_kinds)s)" if exclude_kinds else ""
    where = ("AND c.collection = %(collection)s" if collection else "") + kinds
    source_filter = ("AND s.collection = %(collection)s" if collection else "") + kinds
    vector_filter = where if mode != "text" else where + " AND false"
    params = {
        "candidates": candidates,
        "max_matches": max(settings.RETRIEVAL_TEXT_MAX_MATCHES, 1),
        "terms": " ".join(_query_words(query)),
        "rrf_k": settings.RRF_K,
        "k": k,
        "collection": collection,
        "exclude_kinds": list(exclude_kinds),
    }
    # One snapshot for the version read and both statements, so a source re-ingested or a version
    # promoted in between cannot mix results; SET LOCAL lasts until the end of this transaction only.
    with _search_snapshot(), connection.cursor() as cursor:
        active = embedding_module.active_embedding()
        searched = active
        if embedding_version is not None and embedding_version != active.version_id:
            searched = embedding_module.version_embedding(EmbeddingModelVersion.objects.get(pk=embedding_version))
        if mode == "text":  # the vector leg is off; any vector of the searched dimension will do
            query_embedding = [0.0] * searched.dimension
        elif query_embedding is None or embedding_module.vectors_model_id(query_embedding) not in (None, searched.model_id):
            query_embedding = embedding_module.encoder_for(searched).encode([query])[0]
        if searched is active:
            vector_leg = _ACTIVE_VECTOR_LEG.format(vector_join=join, vector_filter=vector_filter)
        else:
            vector_leg = _SHADOW_VECTOR_LEG.format(vector_join=join, vector_filter=vector_filter,
                                                   dimension=int(searched.dimension), version_id=int(searched.version_id))
        sql = _HYBRID_SQL.format(
            vector_leg=vector_leg, text_join=join, source_filter=source_filter,
            text_filter=where if tsquery and mode != "vector" else where + " AND false",
        )
        params["embedding"] = "[" + ",".join(f"{float(x):.7g}" for x in query_embedding) + "]"
        params["model"] = active.model_id
        cursor.execute("SET LOCAL hnsw.ef_search = %s", [max(settings.HNSW_EF_SEARCH, candidates)])
        if collection or searched is not active:
            # pgvector >= 0.8: keep scanning the graph until enough rows pass the filter.
            cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        cursor.execute(sql, params)
        rows = cursor.fetchall()
        chunks = Chunk.objects.select_related("source").defer(
            "embedding", "search_vector", "source__text"
        ).in_bulk([row[0] for row in rows])
    results = []
    for chunk_id, v_rank, v_distance, t_rank, t_score, score in rows:
        chunk = chunks.get(chunk_id)
        if chunk is None:  # deleted between the two queries
            continue
        results.append(
            RetrievedChunk(
                chunk_id=chunk.pk,
                source_id=chunk.source_id,
                source_uri=chunk.source.uri,
                source_title=chunk.source.title,
                collection=chunk.source.collection,
                ordinal=chunk.ordinal,
                start=chunk.start,
                end=chunk.end,
                text=chunk.text,
                heading_path=list(chunk.heading_path),
                score=float(score),
                vector_rank=v_rank,
                vector_distance=None if v_distance is None else float(v_distance),
                text_rank_position=t_rank,
                text_rank=None if t_score is None else float(t_score),
            )
        )
    return results



# --- curated answers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CuratedMatch:
    """A curated answer whose question is close to a new question: ``curated_id``, its ``question``
    and ``answer``, ``distance`` (cosine distance 0..2 between the new question's embedding and the
    curated question's) and ``evidence`` (the passages that support it, in the writer's order, as
    ``RetrievedChunk`` of the chunks holding them now)."""

    curated_id: int
    question: str
    answer: str
    distance: float
    evidence: list[RetrievedChunk]


def _as_retrieved(chunk: Chunk) -> RetrievedChunk:
    return RetrievedChunk(
        chunk_id=chunk.pk, source_id=chunk.source_id, source_uri=chunk.source.uri, source_title=chunk.source.title,
        collection=chunk.source.collection, ordinal=chunk.ordinal, start=chunk.start, end=chunk.end, text=chunk.text,
        heading_path=list(chunk.heading_path),
    )


def curated_evidence(curated: CuratedAnswer) -> list[RetrievedChunk] | None:
    """The chunks citing ``curated``'s evidence now, in order, or ``None`` when any of it changed: its
    source was deleted, holds other content (another ``content_hash``) or no chunk has that range."""
    found = []
    for evidence in curated.evidence.all():
        if evidence.source_id is None:
            return None
        chunk = (Chunk.objects.select_related("source").defer("embedding", "search_vector", "source__text")
                 .filter(source_id=evidence.source_id, start=evidence.start, end=evidence.end).first())
        if chunk is None or chunk.source.content_hash != evidence.content_hash:
            return None
        found.append(_as_retrieved(chunk))
    return found or None


def curated_answer_match(
    question: str, *, collection: str | None = None, max_distance: float | None = None,
    query_embedding: Sequence[float] | None = None, candidates: int = 5,
) -> CuratedMatch | None:
    """The curated answer of ``collection`` whose question is closest to ``question``, if within
    ``max_distance`` (cosine distance 0..2 between the two questions' embeddings; default the active
    version's ``ActiveEmbedding.curated_match_distance``: ``CURATED_MATCH_MAX_DISTANCE``, chosen in
    ``benchmarks/curated_answers.py``, unless the embedder gate fitted its own) and its evidence is
    unchanged (``curated_evidence``); else ``None``. Retired entries have no chunk and never match.

    Reads the curated chunks (the vector of each curated question) with pgvector's cosine distance:
    the ``candidates`` closest are checked in order. ``query_embedding`` (unit vector of length
    ``EMBEDDING_DIM``) skips embedding ``question``. Returns ``None`` for an empty question.
    """
    from pgvector.django import CosineDistance

    question = (question or "").strip()
    if not question:
        return None
    with transaction.atomic():
        active = embedding_module.active_embedding()
        limit = active.curated_match_distance if max_distance is None else max_distance
        if query_embedding is None or embedding_module.vectors_model_id(query_embedding) not in (None, active.model_id):
            query_embedding = embedding_module.encoder_for(active).encode([question])[0]
        chunks = Chunk.objects.filter(source__kind=Source.Kind.CURATED, embedding_model=active.model_id)
        if collection:
            chunks = chunks.filter(source__collection=collection)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        nearest = list(
            chunks.annotate(distance=CosineDistance("embedding", list(map(float, query_embedding))))
            .filter(distance__lte=limit).order_by("distance").values_list("source_id", "distance")[:candidates]
        )
        nearest.sort(key=lambda row: row[1])  # an iterative index scan may return them slightly out of order
        entries = CuratedAnswer.objects.prefetch_related("evidence").in_bulk(
            [source_id for source_id, _ in nearest], field_name="source_id")
        for source_id, distance in nearest:
            curated = entries.get(source_id)
            if curated is None or curated.retired_reason:
                continue
            evidence = curated_evidence(curated)
            if evidence:
                return CuratedMatch(curated.pk, curated.question, curated.answer, float(distance), evidence)
    return None


def curated_question_vectors(*, embedding_version: int | None = None, limit: int | None = None) -> dict:
    """The stored vector of every live curated answer's question (the one chunk of each, embedded from
    the question) under the active embedding version, or under ``embedding_version`` (an
    ``EmbeddingModelVersion`` id: a candidate's shadow or a retired version's kept vectors in
    ``ChunkEmbedding``): ``{chunk id: numpy float vector of the version's dimension}``, at most
    ``limit`` (lowest chunk ids first; ``None``: all). Retired curated answers have no chunk. What the
    embedder gate fits a candidate's ``curated_match_max_distance`` on."""
    with _search_snapshot():
        active = embedding_module.active_embedding()
        if embedding_version is None or embedding_version == active.version_id:
            rows = (Chunk.objects.filter(source__kind=Source.Kind.CURATED, embedding_model=active.model_id)
                    .order_by("id").values_list("id", "embedding"))
        else:
            rows = (ChunkEmbedding.objects.filter(version_id=embedding_version, chunk__source__kind=Source.Kind.CURATED)
                    .order_by("chunk_id").values_list("chunk_id", "embedding"))
        rows = rows[:limit] if limit is not None else rows
        return {chunk_id: vector for chunk_id, vector in rows if vector is not None}


def curated_answer_list(*, collection: str | None = None, keys: Sequence[str] | None = None):
    """Curated answers (``CuratedAnswer`` queryset, most recently changed first) with their source
    and evidence (and each evidence's source) loaded, optionally of one ``collection`` or with one
    of ``keys``."""
    curated = CuratedAnswer.objects.select_related("source", "edited_by").prefetch_related("evidence__source")
    if collection:
        curated = curated.filter(source__collection=collection)
    if keys is not None:
        curated = curated.filter(key__in=list(keys))
    return curated


def source_ids_unfinished(source_ids: Sequence[int]) -> list[int]:
    """Those of ``source_ids`` whose latest ingestion has not finished (status queued, parsing or
    embedding), in the order given."""
    unfinished = set(
        Source.objects.filter(
            pk__in=list(source_ids),
            status__in=Source.UNFINISHED_STATUSES,
        ).values_list("pk", flat=True)
    )
    return [pk for pk in source_ids if pk in unfinished]
