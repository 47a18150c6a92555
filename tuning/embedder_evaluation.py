"""Comparing a candidate embedder with the served one on held-out corrections: offline in memory
(``embedder_compare``, for benchmarks), and the promotion gate through the serving retrieval
(``embedder_gate_compare`` on the candidate's shadow vectors, ``embedder_gate_decide``), and the
candidate's abstention thresholds (``abstention_calibrate``).

Abstention after a new embedder: ``ABSTAIN_MAX_DISTANCE`` and ``FOLLOW_UP_MAX_DISTANCE`` are cosine
distances chosen on the settings' MiniLM; a fine-tuned embedder moves every distance, so the same
number would decline another share of questions. The gate therefore fits the candidate's own
thresholds by a quantile (Q-Q) mapping of the active version's over the closest distances both
versions give the same questions (the held-out corrections' questions, answerable, and the questions
agents marked unanswerable), stores them on the candidate version, and the pipeline reads the active
version's (falling back to the settings). It then checks the decisions each version makes with its
own threshold: the candidate may not decline more held-out answerable questions, nor fewer
unanswerable ones, than the active version beyond ``TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE``.
``FOLLOW_UP_OWN_MARGIN`` (a difference of distances) is mapped over the same distances, as the
width of the band below the abstention threshold (``abstention_calibrate``); ``CURATED_MATCH_MAX_DISTANCE``
(question to question) by the same quantile mapping over the distances between the curated answers'
questions as each version stored them (``curated_match_calibrate``), so the candidate matches as many
pairs of questions as the active version did.

The offline comparison:

A candidate's vectors are not in the knowledge base (the served vectors stay untouched), so this
re-embeds every chunk with the candidate in memory and searches exactly (cosine = dot product of
unit vectors, ``numpy``), then fuses that vector leg with the same full-text leg as serving
(``knowledge.selectors.chunk_search(mode="text")``) by the same reciprocal rank fusion
(``RETRIEVAL_CANDIDATES`` chunks per leg, ``RRF_K``; Cormack et al., SIGIR 2009), as ``chunk_search``
does in SQL. The served model is scored the same way on its stored vectors, so both arms differ
only in the embedder.

Metrics per held-out correction (query = its anchor, ``retrieval_query`` of the question; gold =
the chunks the agent picked): passage-hit@1/5/10 (a picked chunk in the top k), document-hit@5 (a
chunk of a picked chunk's source in the top 5), MRR@10 (1/rank of the first picked chunk, 0 when
none).

Memory: the chunk matrix is ``n_chunks x dimension`` float32 (100k chunks x 384 = 154 MB).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from django.conf import settings

from knowledge.embedding import passage_text
from knowledge.models import Chunk
from knowledge.selectors import RetrievedChunk, chunk_search
from tuning.embedder_training import EmbedderExample

KS = (1, 5, 10)


@dataclass
class ChunkMatrix:
    """The chunks of the knowledge base (or one collection), in ``ids`` order: ``ids`` (int64
    array), ``source_ids``, ``texts`` (as embedded: ``passage_text``), ``vectors`` (the stored
    served vectors, float32 ``(n, EMBEDDING_DIM)``)."""

    ids: np.ndarray
    source_ids: np.ndarray
    texts: list[str]
    vectors: np.ndarray
    source_of: dict[int, int] = field(default_factory=dict)


def chunk_matrix(collection: str | None = None) -> ChunkMatrix:
    """Every chunk of ``collection`` (all when ``None``) with its stored vector, ordered by id; curated
    answers left out (a held-out correction's own answer would be retrieved for its question)."""
    chunks = Chunk.objects.select_related("source").only(
        "id", "text", "heading_path", "embedding", "source_id", "source__title").exclude(
        source__kind="curated").order_by("pk")
    if collection:
        chunks = chunks.filter(source__collection=collection)
    rows = list(chunks)
    dim = len(rows[0].embedding) if rows else int(settings.EMBEDDING_DIM)  # the active version's
    return ChunkMatrix(
        ids=np.array([c.pk for c in rows], dtype=np.int64),
        source_ids=np.array([c.source_id for c in rows], dtype=np.int64),
        texts=[passage_text(c.source.title, c.heading_path, c.text) for c in rows],
        vectors=np.array([np.asarray(c.embedding, dtype=np.float32) for c in rows]).reshape(len(rows), dim),
        source_of={c.pk: c.source_id for c in rows},
    )


def encode(model, texts: Sequence[str]) -> np.ndarray:
    """``texts`` embedded by a ``SentenceTransformer`` as unit float32 vectors ``(len(texts), dim)``."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    return model.encode(list(texts), batch_size=settings.EMBEDDING_BATCH_SIZE, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def rrf_fuse(legs: Sequence[Sequence[int]], k: int, rrf_k: int | None = None,
             weights: Sequence[float] | None = None) -> list[int]:
    """The ``k`` best chunk ids of ranked legs (best first) by reciprocal rank fusion, ``score =
    sum(weight / (rrf_k + rank))`` (``rrf_k`` default ``RRF_K``; ``weights`` one per leg, default 1
    each: ``chunk_search``'s SQL), ties by chunk id. Raises ``ValueError`` when ``weights`` does not
    give one weight per leg."""
    rrf_k = settings.RRF_K if rrf_k is None else rrf_k
    weights = [1.0] * len(legs) if weights is None else list(weights)
    if len(weights) != len(legs):
        raise ValueError(f"{len(weights)} weights for {len(legs)} legs")
    scores: dict[int, float] = {}
    for leg, weight in zip(legs, weights):
        for rank, chunk_id in enumerate(leg, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + weight / (rrf_k + rank)
    return sorted(scores, key=lambda cid: (-scores[cid], cid))[:k]


def vector_leg(ids: np.ndarray, vectors: np.ndarray, query_vector: np.ndarray, candidates: int) -> list[int]:
    """The ``candidates`` chunk ids closest to ``query_vector`` by cosine (exact), closest first."""
    scores = vectors @ query_vector
    top = np.argsort(-scores, kind="stable")[:candidates]
    return [int(ids[i]) for i in top]


def text_legs(queries: Sequence[str], collection: str | None, candidates: int) -> list[list[int]]:
    """The full-text leg of ``chunk_search`` for each query (chunk ids, best first)."""
    return [[r.chunk_id for r in chunk_search(q, k=candidates, collection=collection, mode="text",
                                              exclude_kinds=("curated",))] for q in queries]


def hybrid_rankings(matrix_ids: np.ndarray, vectors: np.ndarray, query_vectors: np.ndarray,
                    texts_legs: Sequence[Sequence[int]], *, k: int = 10, candidates: int | None = None) -> list[list[int]]:
    """Per query, the ``k`` best chunk ids of the exact vector leg fused with its full-text leg."""
    candidates = candidates or settings.RETRIEVAL_CANDIDATES
    return [rrf_fuse([vector_leg(matrix_ids, vectors, q, candidates), leg], k)
            for q, leg in zip(query_vectors, texts_legs)]


@dataclass(frozen=True)
class HeldoutQuery:
    """One held-out correction: ``query`` (the anchor), ``gold_chunks`` and ``gold_sources`` (ids)."""

    query: str
    gold_chunks: frozenset[int]
    gold_sources: frozenset[int]


def heldout_queries(examples: Sequence[EmbedderExample]) -> list[HeldoutQuery]:
    """One query per correction of ``examples`` (its examples share the anchor), in first-seen order."""
    grouped: dict[int, list[EmbedderExample]] = {}
    for example in examples:
        grouped.setdefault(example.correction_id, []).append(example)
    return [HeldoutQuery(group[0].anchor, frozenset(e.positive_chunk_id for e in group),
                         frozenset(e.positive_source_id for e in group if e.positive_source_id is not None))
            for group in grouped.values()]


def ranking_scores(queries: Sequence[HeldoutQuery], rankings: Sequence[Sequence[int]], source_of: dict[int, int]) -> dict:
    """``{"n", "passage_hit@1", "passage_hit@5", "passage_hit@10", "document_hit@5", "mrr"}`` (shares
    0..1, rounded to 4 places); all 0 for no queries."""
    result = {"n": len(queries), **{f"passage_hit@{k}": 0.0 for k in KS}, "document_hit@5": 0.0, "mrr": 0.0}
    if not queries:
        return result
    reciprocal, passage, document = [], {k: 0 for k in KS}, 0
    for query, ranking in zip(queries, rankings):
        first = next((i for i, cid in enumerate(ranking[:10]) if cid in query.gold_chunks), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
        for k in KS:
            passage[k] += first is not None and first < k
        document += any(source_of.get(cid) in query.gold_sources for cid in ranking[:5])
    result.update({f"passage_hit@{k}": round(passage[k] / len(queries), 4) for k in KS})
    result["document_hit@5"] = round(document / len(queries), 4)
    result["mrr"] = round(statistics.fmean(reciprocal), 4)
    return result


def embedder_compare(candidate_path: str, heldout: Sequence[EmbedderExample], *, collection: str | None = None) -> dict:
    """Score the served embedder (stored vectors) and the candidate at ``candidate_path`` (all chunks
    re-embedded in memory) on the held-out examples, both fused with the full-text leg.

    Returns ``{"served": scores, "candidate": scores, "chunks": int, "reembed_s": float (candidate
    encoding of every chunk, seconds), "candidate_dimension": int}`` with ``ranking_scores``' shape.
    The candidate may have another dimension than the served model. Raises whatever
    sentence-transformers raises for an unreadable model folder.
    """
    from knowledge.embedding import get_embedding_model
    from sentence_transformers import SentenceTransformer

    queries = heldout_queries(heldout)
    matrix = chunk_matrix(collection)
    candidate = SentenceTransformer(str(candidate_path), device=settings.EMBEDDING_DEVICE)
    started = time.perf_counter()
    candidate_vectors = encode(candidate, matrix.texts)
    reembed_s = time.perf_counter() - started
    texts = [q.query for q in queries]
    legs = text_legs(texts, collection, settings.RETRIEVAL_CANDIDATES)
    served_q = get_embedding_model().encode(texts) if texts else np.zeros((0, settings.EMBEDDING_DIM), np.float32)
    candidate_q = encode(candidate, texts)
    return {
        "served": ranking_scores(queries, hybrid_rankings(matrix.ids, matrix.vectors, served_q, legs), matrix.source_of),
        "candidate": ranking_scores(queries, hybrid_rankings(matrix.ids, candidate_vectors, candidate_q, legs),
                                    matrix.source_of),
        "chunks": len(matrix.texts),
        "reembed_s": round(reembed_s, 2),
        "candidate_dimension": int(candidate.get_embedding_dimension()),
    }


# --- the promotion gate, through the serving retrieval ------------------------------------------


def query_scores(query: HeldoutQuery, ranking: Sequence[RetrievedChunk]) -> dict:
    """One held-out query's scores on a ranking (``chunk_search`` results, best first):
    ``{"rr" (1/rank of the first gold chunk in the top 10, 0 without), "passage_hit@1", "@5", "@10",
    "document_hit@5" (0 or 1)}``."""
    ids = [r.chunk_id for r in ranking]
    first = next((i for i, cid in enumerate(ids[:10]) if cid in query.gold_chunks), None)
    return {"rr": 0.0 if first is None else 1.0 / (first + 1),
            **{f"passage_hit@{k}": int(first is not None and first < k) for k in KS},
            "document_hit@5": int(any(r.source_id in query.gold_sources for r in ranking[:5]))}


def _summary(rows: Sequence[dict]) -> dict:
    """``ranking_scores``' shape from ``query_scores`` rows."""
    n = len(rows)
    if not n:
        return {"n": 0, **{f"passage_hit@{k}": 0.0 for k in KS}, "document_hit@5": 0.0, "mrr": 0.0}
    return {"n": n, **{f"passage_hit@{k}": round(sum(r[f"passage_hit@{k}"] for r in rows) / n, 4) for k in KS},
            "document_hit@5": round(sum(r["document_hit@5"] for r in rows) / n, 4),
            "mrr": round(statistics.fmean(r["rr"] for r in rows), 4)}


def closest_distance(ranking: Sequence[RetrievedChunk], k: int | None = None) -> float | None:
    """The smallest cosine distance (0..2) among the first ``k`` (default ``RETRIEVAL_K``, what the
    pipeline retrieves) chunks of ``ranking`` that the vector leg returned: what the pipeline's
    abstention compares with its threshold. ``None`` when none has one (the pipeline declines)."""
    distances = [r.vector_distance for r in ranking[: k or settings.RETRIEVAL_K] if r.vector_distance is not None]
    return round(min(distances), 6) if distances else None


def embedder_gate_compare(heldout: Sequence[EmbedderExample], version_id: int, *, collection: str | None = None,
                          unanswerable: Sequence[str] = ()) -> dict:
    """Score the active embedding version and candidate ``version_id`` (its shadow vectors, built) on
    the held-out examples through the serving retrieval: ``chunk_search`` (hybrid: the version's
    vector leg fused with the full-text leg by RRF), top 10, curated answers excluded (a held-out
    correction's own answer would be retrieved for its question), one query per correction. Each
    question's closest distance (``closest_distance``, cosine 0..2) is recorded per arm, and so is
    that of every ``unanswerable`` question (retrieval queries of questions agents marked unanswerable
    from the knowledge base), for the abstention check (``abstention_calibrate``).

    Returns ``{"served": scores, "candidate": scores, "rows": [{"query", "served": query_scores,
    "candidate": query_scores, "served_distance", "candidate_distance"}], "unanswerable_rows":
    [{"query", "served_distance", "candidate_distance"}], "search_s": float}`` with
    ``ranking_scores``' shape for the scores (distances ``None`` when nothing was found by the vector leg).
    """
    queries = heldout_queries(heldout)
    started = time.perf_counter()
    rows = []
    for query in queries:
        served = chunk_search(query.query, k=10, collection=collection, exclude_kinds=("curated",))
        candidate = chunk_search(query.query, k=10, collection=collection, exclude_kinds=("curated",),
                                 embedding_version=version_id)
        rows.append({"query": query.query, "served": query_scores(query, served),
                     "candidate": query_scores(query, candidate), "served_distance": closest_distance(served),
                     "candidate_distance": closest_distance(candidate)})
    unanswerable_rows = []
    for text in dict.fromkeys(q for q in unanswerable if q and q.strip()):
        k = settings.RETRIEVAL_K
        served = chunk_search(text, k=k, collection=collection, exclude_kinds=("curated",))
        candidate = chunk_search(text, k=k, collection=collection, exclude_kinds=("curated",),
                                 embedding_version=version_id)
        unanswerable_rows.append({"query": text, "served_distance": closest_distance(served),
                                  "candidate_distance": closest_distance(candidate)})
    return {"served": _summary([r["served"] for r in rows]), "candidate": _summary([r["candidate"] for r in rows]),
            "rows": rows, "unanswerable_rows": unanswerable_rows, "search_s": round(time.perf_counter() - started, 2)}


# --- abstention thresholds of a candidate -------------------------------------------------------


def threshold_map(served: Sequence[float], candidate: Sequence[float], threshold: float) -> float:
    """The candidate's distance that sits where ``threshold`` sits among the served version's
    distances: a quantile (Q-Q) mapping between the two versions' closest distances of the same
    questions (cosine, 0..2). ``threshold``'s fractional position among the sorted ``served``
    distances (linear between neighbours) is read off the sorted ``candidate`` distances at the same
    position; outside the served range it keeps its distance to the nearest end (a threshold above
    every served distance stays that far above the candidate's largest). Both lists must hold the
    same questions' distances (same length, at least 1). Returns the mapped threshold, clipped to 0..2.

    So as many of those questions fall within the mapped threshold for the candidate as within
    ``threshold`` for the served version; when both versions order answerable below unrelated
    questions, the candidate then declines the same answerable and unrelated shares.
    """
    s, c = np.sort(np.asarray(served, dtype=float)), np.sort(np.asarray(candidate, dtype=float))
    if len(s) != len(c) or not len(s):
        raise ValueError("threshold_map needs the same questions' distances for both versions")
    if threshold <= s[0]:
        mapped = c[0] - (s[0] - threshold)
    elif threshold >= s[-1]:
        mapped = c[-1] + (threshold - s[-1])
    else:
        positions = np.arange(len(s), dtype=float)
        # Repeated served distances: np.interp needs increasing abscissae; the last of equal ones counts.
        keep = np.append(s[1:] != s[:-1], True)
        position = float(np.interp(threshold, s[keep], positions[keep]))
        mapped = float(np.interp(position, positions, c))
    return float(min(max(mapped, 0.0), 2.0))


def _declined(distances: Sequence[float | None], threshold: float) -> dict:
    """``{"n", "declined" (count), "share" (0..1, 4 places)}`` of questions whose closest distance is
    missing or above ``threshold`` (the pipeline's abstention)."""
    n = len(distances)
    declined = sum(d is None or d > threshold for d in distances)
    return {"n": n, "declined": declined, "share": round(declined / n, 4) if n else 0.0}


def abstention_calibrate(comparison: dict, *, served_threshold: float, served_follow_up: float, fit: bool = True,
                         min_questions: int = 20, served_own_margin: float | None = None) -> dict:
    """The candidate's abstention thresholds, and what both versions decline with theirs.

    ``served_threshold`` / ``served_follow_up`` are the active version's (cosine, 0..2: its fitted
    ones, else ``ABSTAIN_MAX_DISTANCE`` / ``FOLLOW_UP_MAX_DISTANCE``). With ``fit`` and at least
    ``min_questions`` questions (held-out answerable plus unanswerable) with a distance in both arms,
    the candidate's are ``threshold_map`` of them over those questions' closest distances
    (``"method": "quantile"``): a fine-tuned embedder changes the distance scale (the settings' values
    were chosen on MiniLM), and this keeps the share of those questions it answers. Otherwise the
    candidate keeps the active version's values (``"method": "carried"``, the reason in ``"note"``).

    ``served_own_margin`` (the active version's ``FOLLOW_UP_OWN_MARGIN``, a difference of cosine
    distances; ``None``: not fitted) is mapped as the band it cuts below the abstention threshold:
    the candidate's margin is ``candidate_threshold - threshold_map(served_threshold -
    served_own_margin)`` (at least 0), so "own words at least this much closer" keeps its meaning on
    the candidate's scale. A negative margin (the rule off) is carried.

    Returns ``{"method", "note", "questions" (used for the fit), "served_threshold",
    "candidate_threshold", "served_follow_up", "candidate_follow_up", "served_own_margin",
    "candidate_own_margin" (both ``None`` without ``served_own_margin``), "answerable": {"served":
    _declined, "candidate": _declined}, "unanswerable": {... same}}`` (rounded to 4 places).
    """
    rows, others = comparison.get("rows", []), comparison.get("unanswerable_rows", [])
    pairs = [(r["served_distance"], r["candidate_distance"]) for r in [*rows, *others]
             if r.get("served_distance") is not None and r.get("candidate_distance") is not None]
    if fit and len(pairs) >= max(min_questions, 1):
        served_d, candidate_d = [p[0] for p in pairs], [p[1] for p in pairs]
        threshold = threshold_map(served_d, candidate_d, served_threshold)
        follow_up = max(threshold_map(served_d, candidate_d, served_follow_up), threshold)
        own_margin = served_own_margin
        if served_own_margin is not None and served_own_margin >= 0:
            own_margin = max(threshold - threshold_map(served_d, candidate_d, served_threshold - served_own_margin), 0.0)
        method, note = "quantile", (f"fitted on {len(pairs)} questions' closest distances ({len(rows)} held-out "
                                    f"answerable, {len(others)} unanswerable)")
    else:
        threshold, follow_up, own_margin, method = served_threshold, served_follow_up, served_own_margin, "carried"
        note = ("calibration is off (TUNING_EMBEDDER_CALIBRATE_ABSTENTION)" if not fit else
                f"{len(pairs)} question(s) with distances, fewer than the {min_questions} a fit needs; "
                "the active version's thresholds are kept")
    return {
        "method": method, "note": note, "questions": len(pairs),
        "served_threshold": round(float(served_threshold), 4), "candidate_threshold": round(threshold, 4),
        "served_follow_up": round(float(served_follow_up), 4), "candidate_follow_up": round(follow_up, 4),
        "served_own_margin": None if served_own_margin is None else round(float(served_own_margin), 4),
        "candidate_own_margin": None if own_margin is None else round(float(own_margin), 4),
        "answerable": {"served": _declined([r.get("served_distance") for r in rows], served_threshold),
                       "candidate": _declined([r.get("candidate_distance") for r in rows], threshold)},
        "unanswerable": {"served": _declined([r.get("served_distance") for r in others], served_threshold),
                         "candidate": _declined([r.get("candidate_distance") for r in others], threshold)},
    }


def curated_match_calibrate(served: dict, candidate: dict, *, served_threshold: float, fit: bool = True,
                            min_questions: int = 20, max_questions: int = 1500, seed: int = 0) -> dict:
    """The candidate's curated-answer match threshold (``CURATED_MATCH_MAX_DISTANCE`` on its scale).

    ``served`` / ``candidate``: ``{chunk id: vector}`` of the curated answers' questions as the active
    version and the candidate stored them (``knowledge.selectors.curated_question_vectors``; any
    dimensions). Over the curated answers both hold (at most ``max_questions``, a ``seed``ed sample),
    the cosine distance (0..2) of every pair of their questions is taken in each version, and with
    ``fit`` and at least ``min_questions`` of them the candidate's threshold is ``threshold_map`` of
    ``served_threshold`` (the active version's) over those pair distances (``"method": "quantile"``):
    the candidate then counts as many pairs of questions within its threshold as the active version
    did within its own, the share a curated match is served on. Otherwise it carries the active
    version's (``"method": "carried"``, the reason in ``"note"``).

    Pairs of n questions are n(n-1)/2 (1,500 questions: 1.1 M pairs, two float64 n x n matrices,
    36 MB). Returns ``{"method", "note", "questions", "pairs", "served_threshold",
    "candidate_threshold" (4 places), "pairs_within": {"served", "candidate"}}``.
    """
    ids = sorted(set(served) & set(candidate))
    if len(ids) > max_questions:
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=max_questions, replace=False).tolist())
    result = {"questions": len(ids), "pairs": len(ids) * (len(ids) - 1) // 2,
              "served_threshold": round(float(served_threshold), 4)}
    if not fit or len(ids) < max(min_questions, 2):
        note = ("calibration is off (TUNING_EMBEDDER_CALIBRATE_ABSTENTION)" if not fit else
                f"{len(ids)} curated question(s) in both versions, fewer than the {min_questions} a fit needs; "
                "the active version's threshold is kept")
        return {**result, "method": "carried", "note": note, "candidate_threshold": round(float(served_threshold), 4),
                "pairs_within": None}

    def pair_distances(vectors: dict) -> np.ndarray:
        matrix = np.asarray([np.asarray(vectors[i], dtype=float) for i in ids])
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        upper = np.triu_indices(len(ids), k=1)
        return 1.0 - (matrix @ matrix.T)[upper]

    served_d, candidate_d = pair_distances(served), pair_distances(candidate)
    threshold = threshold_map(served_d, candidate_d, served_threshold)
    return {**result, "method": "quantile", "candidate_threshold": round(threshold, 4),
            "note": f"fitted on the {result['pairs']} pairs of {len(ids)} curated answers' questions",
            "pairs_within": {"served": int((served_d <= served_threshold).sum()),
                             "candidate": int((candidate_d <= threshold).sum())}}


@dataclass(frozen=True)
class EmbedderGate:
    """The embedder gate's settings: ``min_mrr_gain`` (the lower end of the paired interval of the
    per-question MRR@10 gain must be above it), ``hit_tolerance`` (passage-hit@5 and document-hit@5 may
    drop by at most this, absolute), ``abstention_tolerance`` (with its own thresholds the candidate
    may decline at most this larger a share of the held-out answerable questions, and at most this
    smaller a share of the unanswerable ones, than the active version with its; absolute, 0..1), and
    the interval's ``confidence``, ``resamples``, ``seed``."""

    min_mrr_gain: float = 0.0
    hit_tolerance: float = 0.0
    confidence: float = 0.95
    resamples: int = 10000
    seed: int = 0
    abstention_tolerance: float = 0.0

    @classmethod
    def from_settings(cls) -> "EmbedderGate":
        """``TUNING_EMBEDDER_GATE_MIN_MRR_GAIN``, ``TUNING_EMBEDDER_GATE_HIT_TOLERANCE``,
        ``TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE`` and the generator gate's ``TUNING_GATE_CONFIDENCE``
        / ``_BOOTSTRAP_RESAMPLES`` / ``_BOOTSTRAP_SEED``."""
        return cls(min_mrr_gain=settings.TUNING_EMBEDDER_GATE_MIN_MRR_GAIN,
                   hit_tolerance=settings.TUNING_EMBEDDER_GATE_HIT_TOLERANCE,
                   confidence=settings.TUNING_GATE_CONFIDENCE, resamples=settings.TUNING_GATE_BOOTSTRAP_RESAMPLES,
                   seed=settings.TUNING_GATE_BOOTSTRAP_SEED,
                   abstention_tolerance=settings.TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE)


def embedder_gate_decide(comparison: dict, gate: EmbedderGate | None = None, abstention: dict | None = None) -> dict:
    """Whether the candidate of ``comparison`` (``embedder_gate_compare``) should replace the active
    embedder: a paired comparison, as the generator's gate (``tuning.evaluation.gate_decide``). Promote
    only when the lower end of the ``confidence`` interval of the per-question MRR@10 gain (paired
    bootstrap, ``tuning.evaluation.paired_gain_interval``) is above ``min_mrr_gain``, neither
    passage-hit@5 nor document-hit@5 drops by more than ``hit_tolerance``, and, given ``abstention``
    (``abstention_calibrate``: each version with its own threshold), the candidate declines at most
    ``abstention_tolerance`` more of the held-out answerable questions and at most that much fewer of
    the unanswerable ones (checked only when there are some).

    Returns ``{"promote": bool, "reason": str, "mrr_gain" (mean or None), "mrr_gain_interval" (dict or
    None), "passage_hit@5_change", "document_hit@5_change", "served", "candidate" (the scores), "gate"
    (the settings), "abstention" (as given, or None)}``.
    """
    from tuning.evaluation import paired_gain_interval

    gate = gate or EmbedderGate.from_settings()
    served, candidate, rows = comparison["served"], comparison["candidate"], comparison["rows"]
    interval = paired_gain_interval([r["candidate"]["rr"] for r in rows], [r["served"]["rr"] for r in rows],
                                    confidence=gate.confidence, resamples=gate.resamples, seed=gate.seed)
    passage = round(candidate["passage_hit@5"] - served["passage_hit@5"], 4)
    document = round(candidate["document_hit@5"] - served["document_hit@5"], 4)
    decision = {"mrr_gain": interval["mean"] if interval else None, "mrr_gain_interval": interval,
                "passage_hit@5_change": passage, "document_hit@5_change": document,
                "served": served, "candidate": candidate, "gate": asdict(gate), "abstention": abstention}

    def keep(reason: str) -> dict:
        return {**decision, "promote": False, "reason": reason}

    if interval is None:
        return keep("fewer than 2 held-out questions: the MRR gain cannot be tested")
    span = f"{gate.confidence:.0%} interval [{interval['low']:+.4f}, {interval['high']:+.4f}]"
    if interval["low"] <= gate.min_mrr_gain:
        return keep(f"MRR@10 {candidate['mrr']} vs the active embedder's {served['mrr']}: gain {interval['mean']:+.4f}, "
                    f"{span} over {interval['questions']} questions; its lower end is not above "
                    f"{gate.min_mrr_gain:+.4f}, so the gain may be noise")
    if passage < -gate.hit_tolerance:
        return keep(f"passage-hit@5 drops by {-passage:.4f} ({candidate['passage_hit@5']} vs {served['passage_hit@5']}; "
                    f"tolerance {gate.hit_tolerance})")
    if document < -gate.hit_tolerance:
        return keep(f"document-hit@5 drops by {-document:.4f} ({candidate['document_hit@5']} vs "
                    f"{served['document_hit@5']}; tolerance {gate.hit_tolerance})")
    abstained = ""
    if abstention is not None:
        answerable, unanswerable = abstention["answerable"], abstention["unanswerable"]
        thresholds = (f"candidate threshold {abstention['candidate_threshold']} ({abstention['method']}), active "
                      f"{abstention['served_threshold']}")
        more = round(answerable["candidate"]["share"] - answerable["served"]["share"], 4)
        if more > gate.abstention_tolerance:
            return keep(f"it declines {answerable['candidate']['declined']} of {answerable['candidate']['n']} held-out "
                        f"answerable questions against the active embedder's {answerable['served']['declined']} "
                        f"(+{more:.4f}; tolerance {gate.abstention_tolerance}; {thresholds})")
        fewer = round(unanswerable["served"]["share"] - unanswerable["candidate"]["share"], 4)
        if unanswerable["served"]["n"] and fewer > gate.abstention_tolerance:
            return keep(f"it declines {unanswerable['candidate']['declined']} of {unanswerable['candidate']['n']} "
                        f"unanswerable questions against the active embedder's {unanswerable['served']['declined']} "
                        f"(-{fewer:.4f}; tolerance {gate.abstention_tolerance}; {thresholds})")
        abstained = (f"; declines {answerable['candidate']['declined']}/{answerable['candidate']['n']} answerable "
                     f"(active {answerable['served']['declined']}) and {unanswerable['candidate']['declined']}/"
                     f"{unanswerable['candidate']['n']} unanswerable (active {unanswerable['served']['declined']}), "
                     f"{thresholds}")
    return {**decision, "promote": True,
            "reason": f"MRR@10 {candidate['mrr']} vs {served['mrr']} (gain {interval['mean']:+.4f}, {span}); "
                      f"passage-hit@5 {passage:+.4f}, document-hit@5 {document:+.4f}{abstained}"}
