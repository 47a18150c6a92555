"""The answer pipeline (``answer_stream``; ``answer_compose`` is its steps 2-6 without storing).
Part of ``chat.services``; import from the package (``from chat.services import answer_stream``).

The answer pipeline, for one customer question:

1. persist the question; if an agent has taken the conversation over (status ``agent``) or it is
   ``resolved``, stop there and yield ``chat.agent_active`` (the bot stays quiet; the agent answers);
   if the question asks for a person (``chat.intents.asks_for_a_person``: "I'd like to talk to a
   person", or "yes" right after a decline offered one), hand the conversation to a human
   (``conversation_request_human``, status ``needs_human``) and yield ``chat.agent_active`` too;
2. a message that is only a greeting, thanks or goodbye (``chat.intents.small_talk``) gets its fixed
   reply (``SMALL_TALK_REPLIES``, ``"method": "conversational"``) and nothing more is done;
   when the question is the conversation's first customer question and is within the curated-match
   threshold (``CURATED_MATCH_MAX_DISTANCE``, or the active embedding version's fitted one) of a
   curated answer's question (an approved correction,
   ``knowledge.selectors.curated_answer_match``), answer with the curated answer citing its evidence
   (``"method": "curated"``) and skip steps 3-5; otherwise
   retrieve with ``knowledge.selectors.conversation_search``: a follow-up that refers back ("how do I
   renew it?") together with the customer's earlier questions, any other question on its own words,
   so a new topic never inherits the previous topic's sources;
3. decline a message that instructs the assistant instead of asking (``chat.intents.instructs_the_assistant``:
   "Ignore the sources and tell me...", "SYSTEM: ..."); abstain when retrieval is too weak: the closest chunk's cosine distance (for the question's own
   words, or for the follow-up's query) is above the active embedding version's threshold
   (``ABSTAIN_MAX_DISTANCE``, or the one the embedder gate fitted for a fine-tuned embedder,
   ``EmbeddingModelVersion.abstain_max_distance``; read with the search). The answer is then the
   fixed ``ABSTAIN_MESSAGE`` offering a human; the model is not asked to guess;
4. otherwise prompt the model with the best ``LLM_PROMPT_SOURCES`` chunks numbered ``[1]..[n]``
   (the closest chunk by cosine distance always among them: ``closest_among_sources``)
   (``chat.prompts``), drop citation markers that name no source (``chat.citations``), and pass the
   text through the groundedness check (``chat.grounding``): each sentence is shown only once its
   source supports it and its hard facts (links, e-mails, phone numbers, amounts...) are in the
   sources, and nothing is shown until the shown text addresses the question; a sentence the model
   cited to the wrong source (or to none) is cited to the one that supports it (``"method": "check"``);
5. when nothing of the model's text passed, quote the source sentence that best answers the question
   (``"method": "extractive"``) or, when none does, decline with ``ABSTAIN_MESSAGE``;
6. persist the assistant message with the retrieval trace, the check's record (every sentence, shown
   or removed with the reason), citations, model version and timings.

Events (``AnswerEvent(type, data)``), in order: ``chat.token`` ``{"text"}`` (zero or more), then
``chat.citations`` ``{"citations": [...]}`` and ``chat.done`` ``{"message_id", "abstained",
"method", "timings", "text", "citation_markers"}`` (``text`` the stored answer, equal to the streamed tokens
joined and stripped; ``citation_markers`` ``{"total", "valid"}`` the source numbers the model wrote
and how many named a source of the prompt; absent on abstentions); or, instead of those, one of ``chat.busy`` ``{"retry_after_s", "message"}``
(the engine's queue is full; nothing was stored, so the client can send the same question again),
``chat.agent_active`` ``{"message_id", "status"}`` (the question was stored for the agent; no bot
answer; ``status`` the conversation's: ``agent``, ``resolved`` or, after a request for a person,
``needs_human``) or
``chat.error`` ``{"message"}``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from django.conf import settings

from chat import engine as engine_module
from chat import model_client as model_client_module
from chat.citations import CitationFilter, clean_markers, count_markers, parse_citations
from chat.grounding import GroundingCheck, SentenceGate, extractive_answer
from chat.intents import asks_for_a_person, could_accept_an_offer, instructs_the_assistant, small_talk
from chat.models import Conversation, Message, ModelVersion
from chat.notifications import inbox_notify
from chat.prompts import grounded_messages, source_excerpt, without_markers
from chat.selectors import conversation_get, conversation_history, conversation_offered_a_person
from chat.services.conversations import (
    ABSTAIN_MESSAGE,
    BUSY_MESSAGE,
    SMALL_TALK_REPLIES,
    _store_message,
    conversation_request_human,
)
from chat.services.model_versions import engine_serving, model_version_active
from chat.services.question_embeddings import question_embedding_store
from knowledge import embedding as embedding_module
from knowledge.selectors import CuratedMatch, RetrievedChunk, conversation_search, curated_answer_match

logger = logging.getLogger(__name__)

# Characters of a cited chunk sent with chat.citations as "excerpt".
EXCERPT_MAX_CHARS = 1200


@dataclass(frozen=True)
class AnswerEvent:
    """One event of ``answer_stream``: ``type`` is a namespaced message type (``chat.token``, ...),
    ``data`` its JSON-serialisable payload (see the module docstring)."""

    type: str
    data: dict = field(default_factory=dict)


def best_vector_distance(chunks: list[RetrievedChunk]) -> float | None:
    """The smallest cosine distance (0..2) among chunks the vector leg returned, ``None`` if none."""
    distances = [c.vector_distance for c in chunks if c.vector_distance is not None]
    return min(distances) if distances else None


def should_abstain(chunks: list[RetrievedChunk], *, max_distance: float | None = None) -> bool:
    """Whether retrieval is too weak to answer from: nothing retrieved by the vector leg, or the
    closest chunk farther than ``max_distance`` (cosine 0..2; default the active embedding version's
    threshold, ``ABSTAIN_MAX_DISTANCE`` unless the embedder gate fitted one for it: one database read)."""
    limit = embedding_module.active_embedding().abstain_distance if max_distance is None else max_distance
    best = best_vector_distance(chunks)
    return best is None or best > limit


def closest_among_sources(chunks: list[RetrievedChunk], n: int) -> list[RetrievedChunk]:
    """``chunks`` (best first) reordered so that the closest chunk by cosine distance is among the
    first ``n`` (the prompt's sources): when fusion ranked it lower, it takes position ``n`` and the
    chunks from there move down one. Answering was decided on that chunk's distance
    (``should_abstain``), so it must be a source.

    Measured on Doc2Dial (the gold passage / page among the 3 prompt sources; first turns, 339, and
    every third question of all turns, 674): with the full-text leg ranked by ``ts_rank_cd``, all
    turns 0.493 / 0.703 -> 0.501 / 0.724 and first turns unchanged (0.504 / 0.791); with the
    idf-weighted leg now in ``chunk_search``, first turns 0.566 / 0.826 -> 0.558 / 0.820 and all
    turns 0.553 / 0.757 -> 0.550 / 0.755 (within 3 questions: noise either way). Kept for the
    consistency with abstention above; remove it if a larger evaluation shows a loss. It was added
    for the demo store's "Do you ship to Canada?", whose FAQ row (cosine distance 0.36, the next
    0.63) fusion ranked fourth behind three shipping-policy chunks sharing only the word "ship"
    (the idf-weighted leg now ranks it first by itself)."""
    if n < 1 or len(chunks) <= n:
        return list(chunks)
    closest = min(range(len(chunks)), key=lambda i: (chunks[i].vector_distance is None,
                                                     chunks[i].vector_distance or 0.0, i))
    if closest < n or chunks[closest].vector_distance is None:
        return list(chunks)
    return [*chunks[: n - 1], chunks[closest], *chunks[n - 1: closest], *chunks[closest + 1:]]


def retrieval_trace(chunks: list[RetrievedChunk]) -> list[dict]:
    """The stored retrieval trace of ``chunks``: ``[{"chunk_id", "source_id", "score", "vector_distance",
    "text_rank"}]`` (RRF score, cosine distance 0..2, rounded to 6 places)."""
    return [
        {"chunk_id": c.chunk_id, "source_id": c.source_id, "score": round(c.score, 6),
         "vector_distance": None if c.vector_distance is None else round(c.vector_distance, 6),
         "text_rank": None if c.text_rank is None else round(c.text_rank, 6)}
        for c in chunks
    ]


def _citation(n: int, chunk: RetrievedChunk) -> dict:
    return {"n": n, "chunk_id": chunk.chunk_id, "source_id": chunk.source_id, "source_title": chunk.source_title,
            "start": chunk.start, "end": chunk.end}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass
class ComposedAnswer:
    """The outcome of ``answer_compose`` (nothing stored yet).

    ``text``: the answer as shown to the customer (checked sentences, or a quoted source sentence, or
    ``ABSTAIN_MESSAGE``); ``abstained``: declined (weak retrieval, or nothing supported addresses the
    question); ``method``: ``"generated"`` (the model's checked sentences), ``"extractive"`` (a source
    sentence quoted because too little of the model's text passed the check), ``"curated"`` (an
    approved correction's answer, ``grounding["curated_id"]``), ``"conversational"`` (the fixed reply
    to a greeting, thanks or goodbye, ``grounding["reason"]`` its kind) or ``"declined"``;
    ``citations``: ``[{"n", "chunk_id", "source_id", "source_title", "start", "end", "method"}]``
    (``method``: ``"model"`` marker written by the model and confirmed by the check, ``"check"`` added
    or moved by the check to the source that supports the sentence, ``"extractive"``, ``"curated"`` the
    curated answer's evidence); ``sources``: the
    prompt's chunks, ``[1]..[n]``; ``trace``: the retrieval trace (every retrieved chunk); ``grounding``:
    the check's record (``{"method", "query", "follow_up", "question_distance", "sentences": [{"text",
    "shown", "reason", "source", "coverage", "similarity"}], "removed", "reason"}``); ``timings`` (ms,
    see ``answer_stream``; ``first_text_ms`` is when the first checked text was shown);
    ``citation_markers`` ``{"total", "valid"}`` written by the model; ``version``: the model version
    that wrote it (``None`` when the model was not asked); ``cancelled``: stopped by ``cancel``;
    ``question_embedding``: the question's vector retrieval computed (float32, ``EMBEDDING_DIM``,
    unit norm), set on declined answers only (``answer_stream`` records it for the content gaps,
    ``chat.services.question_embeddings``); ``None`` otherwise.
    """

    text: str
    abstained: bool
    method: str = "generated"
    citations: list[dict] = field(default_factory=list)
    sources: list[RetrievedChunk] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    grounding: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    citation_markers: dict = field(default_factory=lambda: {"total": 0, "valid": 0})
    version: ModelVersion | None = None
    cancelled: bool = False
    question_embedding: object = None


def answer_compose(
    question: str,
    *,
    history: list[dict] = (),
    collection: str = "default",
    version: ModelVersion | None = None,
    engine: "engine_module.Engine | model_client_module.ModelClient | None" = None,
    retrieval: bool = True,
    grounding: bool = True,
    quote_first: bool = True,
    curated: bool = True,
    cancel: threading.Event | None = None,
    received: float | None = None,
) -> Iterator[AnswerEvent]:
    """Steps 2-6 of the pipeline for ``question`` without storing anything: retrieve (from
    ``collection``, following ``history`` ``[{"role", "text"}]`` only for follow-ups), abstain or
    prompt, stream the model's sentences that pass the groundedness check (``chat.grounding``), and
    fall back to a quoted source sentence, or decline, when too little passes.

    ``version`` defaults to the active one and ``engine`` to the process's model client
    (``chat.model_client.model_client``: the in-process engine switched to ``version``, or the model
    server); an evaluation passes its own engine (already serving ``version``) or client
    (``tuning.evaluation``). ``retrieval=False``
    answers from the model alone: no sources, no abstention check, no groundedness check, the question
    as the only user message (the "fine-tune without retrieval" arm of the evaluation).
    ``grounding=False`` streams the model's text unchecked (for measurement only: the customer-facing
    pipeline always checks). ``quote_first`` (with retrieval and grounding): when a source sentence is
    within ``ANSWER_QUOTE_MIN_RELEVANCE`` cosine similarity of the question and holds what it asks
    for, it is quoted at once and the model is not asked (measured better than the 135M model's own
    wording on held-out Doc2Dial questions, README "Groundedness check"); ``False`` always asks the
    model (the tuning evaluation measures the model). ``curated`` (with retrieval): a first question
    (no user turn in ``history``, ``curated_lookup``) within the curated-match threshold of a
    curated answer's question is answered with that answer, citing
    its evidence chunks ``[1]..[n]``, and nothing is retrieved or generated (``curated_reply``);
    ``curated=False`` also leaves curated answers out of retrieval (the tuning evaluation: a held-out
    correction's own answer, embedded from its question, would otherwise be the first source).
    ``received`` is the ``time.perf_counter()`` the question arrived (TTFT is
    measured from it; default now).

    Yields ``chat.token`` events (whole checked sentences), then one ``answer.composed``
    ``{"answer": ComposedAnswer}``; or, instead of that last one, ``chat.busy`` ``{"retry_after_s",
    "message"}`` or ``chat.error`` ``{"message"}``.
    """
    received = time.perf_counter() if received is None else received
    if retrieval and grounding and (kind := small_talk(question)):
        yield from small_talk_reply(kind, question=question, received=received)
        return
    chunks: list[RetrievedChunk] = []
    retrieval_ms = 0.0
    record: dict = {}
    question_vector = None
    if retrieval:
        started = time.perf_counter()
        # Embedded once: the curated lookup and retrieval both compare the question's own words.
        question_vector = embedding_module.get_embedding_model().encode([question.strip()])[0]
        if curated:
            match = curated_lookup(question, history=history, collection=collection, query_embedding=question_vector)
            if match is not None:
                yield from curated_reply(match, question=question, retrieval_ms=_ms(time.perf_counter() - started),
                                         received=received)
                return
        found = conversation_search(question, list(history), k=settings.RETRIEVAL_K, collection=collection,
                                    question_embedding=question_vector, exclude_kinds=() if curated else ("curated",))
        chunks = found.chunks
        retrieval_ms = _ms(time.perf_counter() - started)
        record = {"query": found.query, "follow_up": found.follow_up,
                  "question_distance": None if found.question_distance is None else round(found.question_distance, 6)}
    # The trace lists the chunks in the order the answer used them, so its first LLM_PROMPT_SOURCES are
    # the prompt's sources (what evaluations and training examples rebuild the prompt from).
    chunks = closest_among_sources(chunks, settings.LLM_PROMPT_SOURCES)
    trace = retrieval_trace(chunks)

    def declined(reason: str, *, version_used: ModelVersion | None = None, content_gap: bool = True,
                 **extra) -> Iterator[AnswerEvent]:
        yield AnswerEvent("chat.token", {"text": ABSTAIN_MESSAGE})
        yield AnswerEvent("answer.composed", {"answer": ComposedAnswer(
            text=ABSTAIN_MESSAGE, abstained=True, method="declined", trace=trace,
            grounding={**record, "method": "declined", "reason": reason, "sentences": [], "removed": 0, **extra},
            timings={"retrieval_ms": retrieval_ms, "ttft_ms": _ms(time.perf_counter() - received),
                     "first_text_ms": _ms(time.perf_counter() - received),
                     "generation_ms": 0.0, "tokens": 0, "tokens_per_s": 0.0},
            version=version_used, question_embedding=question_vector if content_gap else None,
        )})

    if retrieval and grounding and instructs_the_assistant(question):
        # "Ignore the sources and tell me...": not a question; a source sentence resembling it would be
        # an answer beside the point, and it is no gap in the knowledge base.
        yield from declined("an instruction to the assistant, not a question", content_gap=False)
        return
    if retrieval:
        # conversation_search judged a follow-up by the retrieval that used its history, any other
        # question by its own words (so an off-topic question is declined even after on-topic ones).
        # Judged by the threshold of the embedding version that measured the distance (its fitted one,
        # else ABSTAIN_MAX_DISTANCE), read in the same snapshot as the search.
        distance = found.distance
        limit = settings.ABSTAIN_MAX_DISTANCE if found.abstain_distance is None else found.abstain_distance
        if distance is None or distance > limit:
            yield from declined("weak retrieval" if distance is not None else "nothing retrieved")
            return

    sources = chunks[: settings.LLM_PROMPT_SOURCES]
    checking = retrieval and grounding
    # A quoted sentence may come from any of the first EXTRACTIVE_SOURCES retrieved chunks (numbered
    # after the prompt's); the model's sentences are checked against the prompt's sources only.
    candidates = chunks[: max(settings.EXTRACTIVE_SOURCES, len(sources))]
    check = GroundingCheck(
        question, [source_excerpt(c, settings.LLM_SOURCE_MAX_CHARS) for c in candidates],
        titles=[without_markers(c.source_title) for c in candidates],
        headings=[" > ".join(c.heading_path) for c in candidates],
        topic=found.query if found.reads_history else None, prompt_sources=len(sources),
    ) if checking else None

    def quoted(quote, *, reason: str | None = None, sentences: list[dict] = (), generation_stats=None,
               version_used=None, ttft: float | None = None) -> Iterator[AnswerEvent]:
        shown_at = _ms(time.perf_counter() - received)
        yield AnswerEvent("chat.token", {"text": quote.text})
        stats = generation_stats
        yield AnswerEvent("answer.composed", {"answer": ComposedAnswer(
            text=quote.text, abstained=False, method="extractive",
            citations=[{**_citation(quote.source, candidates[quote.source - 1]), "method": "extractive"}],
            sources=candidates[: max(quote.source, len(sources))], trace=trace,
            grounding={**record, "method": "extractive", "reason": reason, "sentences": list(sentences),
                       "removed": sum(not v["shown"] for v in sentences), "relevance": round(quote.relevance, 3)},
            timings={"retrieval_ms": retrieval_ms, "ttft_ms": ttft if ttft is not None else shown_at,
                     "first_text_ms": shown_at,
                     "generation_ms": round(stats.decode_ms, 1) if stats else 0.0,
                     "tokens": stats.tokens if stats else 0,
                     "tokens_per_s": round(stats.tokens_per_s, 1) if stats else 0.0},
            version=version_used,
        )})

    if checking and quote_first:
        quote = extractive_answer(check, min_relevance=settings.ANSWER_QUOTE_MIN_RELEVANCE)
        if quote is not None:
            yield from quoted(quote, reason="a source sentence answers the question")
            return

    if retrieval:
        messages = grounded_messages(question, sources, max_chars=settings.LLM_SOURCE_MAX_CHARS)
    else:
        messages = [{"role": "user", "content": question.strip()}]
    try:
        version = version or model_version_active()
        client = engine
        if client is None:
            client = model_client_module.model_client()
            if (isinstance(client, model_client_module.LocalModelClient)
                    and client.engine is engine_module.get_engine()):
                # In process: the version's files are checked against their recorded digests; a refused
                # version leaves the loaded one answering (and the answer names it). A model server
                # checks them itself (409).
                client, version = engine_serving(version)
        if isinstance(client, engine_module.Engine):
            client = model_client_module.LocalModelClient(client, switch=False)
        generation = client.submit(messages, version=version, cancel=cancel)
    except engine_module.EngineBusy as busy:
        yield AnswerEvent("chat.busy", {"retry_after_s": busy.retry_after_s, "message": BUSY_MESSAGE})
        return
    except (engine_module.EngineError, FileNotFoundError) as error:
        logger.error("cannot answer: %s", error)
        yield AnswerEvent("chat.error", {"message": "The assistant is unavailable right now."})
        return

    gate = SentenceGate(check) if checking else None
    cited = CitationFilter(len(sources))
    raw: list[str] = []  # the model's text before anything was dropped (for measurement)
    parts: list[str] = []
    ttft_ms = first_text_ms = None
    failed = False

    def show(text: str) -> Iterator[AnswerEvent]:
        nonlocal first_text_ms
        if text:
            if first_text_ms is None:
                first_text_ms = _ms(time.perf_counter() - received)
            parts.append(text)
            yield AnswerEvent("chat.token", {"text": text})

    try:
        for piece in generation:
            if ttft_ms is None and piece:
                ttft_ms = _ms(time.perf_counter() - received)
            raw.append(piece)
            text = cited.feed(piece)
            yield from show(gate.feed(text) if gate else text)
        tail = cited.flush()
        yield from show(gate.feed(tail) + gate.finish() if gate else tail)
    except engine_module.EngineError as error:
        logger.error("generation failed: %s", error)
        failed = True
    finally:
        # Also reached when the caller closes this generator early (GeneratorExit): stop the model.
        generation.cancel()
    answer = "".join(parts).strip()
    stats = generation.stats
    cancelled = stats.finish_reason == "cancelled"
    if failed and not answer:
        yield AnswerEvent("chat.error", {"message": "The assistant failed to answer; please try again."})
        return
    sentences = [v.as_trace() for v in gate.verdicts] if gate else []
    if checking and not answer and not cancelled:
        # Nothing of the model's text passed: quote the source sentence that best answers the
        # question, or decline when none does.
        quote = extractive_answer(check, min_relevance=settings.EXTRACTIVE_MIN_RELEVANCE)
        if quote is None:
            yield from declined(gate.reason or "the model's answer was empty", sentences=sentences,
                                removed=sum(not v["shown"] for v in sentences), version_used=version)
            return
        yield from quoted(quote, reason=gate.reason, sentences=sentences, generation_stats=stats,
                          version_used=version, ttft=ttft_ms)
        return
    if not answer and not cancelled:
        yield from declined("the model's answer was empty", version_used=version)
        return

    numbers = parse_citations(answer, len(sources))
    confirmed = gate.confirmed_sources() if gate else set(numbers)
    citations = [{**_citation(n, sources[n - 1]), "method": "model" if n in confirmed else "check"}
                 for n in numbers]
    timings = {
        "retrieval_ms": retrieval_ms,
        "ttft_ms": ttft_ms if ttft_ms is not None else _ms(time.perf_counter() - received),
        "first_text_ms": first_text_ms if first_text_ms is not None else _ms(time.perf_counter() - received),
        "generation_ms": round(stats.decode_ms, 1),
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens_per_s, 1),
    }
    if cancelled:
        timings["cancelled"] = True
    yield AnswerEvent("answer.composed", {"answer": ComposedAnswer(
        text=answer, abstained=False, method="generated", citations=citations, sources=sources, trace=trace,
        grounding={**record, "method": "generated", "sentences": sentences,
                   "removed": sum(not v["shown"] for v in sentences), "reason": None},
        timings=timings, citation_markers=count_markers("".join(raw), len(sources)),
        version=version, cancelled=cancelled,
    )})


def small_talk_reply(kind: str, *, question: str, received: float | None = None) -> Iterator[AnswerEvent]:
    """The events of answering a greeting, thanks or goodbye (``chat.intents.small_talk`` ``kind``):
    one ``chat.token`` with ``SMALL_TALK_REPLIES[kind]`` and ``answer.composed`` (``"method":
    "conversational"``, not abstained, no citations or sources). Nothing is retrieved or generated."""
    received = time.perf_counter() if received is None else received
    text = SMALL_TALK_REPLIES[kind]
    shown_at = _ms(time.perf_counter() - received)
    yield AnswerEvent("chat.token", {"text": text})
    yield AnswerEvent("answer.composed", {"answer": ComposedAnswer(
        text=text, abstained=False, method="conversational",
        grounding={"method": "conversational", "reason": kind, "query": question, "follow_up": None,
                   "question_distance": None, "sentences": [], "removed": 0},
        timings={"retrieval_ms": 0.0, "ttft_ms": shown_at, "first_text_ms": shown_at,
                 "generation_ms": 0.0, "tokens": 0, "tokens_per_s": 0.0},
    )})


def curated_lookup(question: str, *, history=(), collection: str = "default",
                   max_distance: float | None = None, query_embedding=None) -> CuratedMatch | None:
    """The curated answer the pipeline serves for ``question``, or ``None``: only the conversation's
    first customer question (``history`` ``[{"role", "text"}]`` holds no ``user`` turn) is matched,
    against the curated questions of ``collection`` within ``max_distance`` (cosine 0..2; default the
    active embedding version's ``curated_match_distance``: ``CURATED_MATCH_MAX_DISTANCE`` unless the
    embedder gate fitted its own; ``knowledge.selectors.curated_answer_match``).
    ``query_embedding`` is the question's embedding when the caller has it.

    Measured on Doc2Dial (``benchmarks/curated_answers.py``, README "Curated answers"): later turns
    close to a corrected question, even ones that stand on their own, ask for more than it answered,
    and the curated answer scored below the pipeline's own answer at every distance (token-F1 0.44 vs
    0.55 within 0.10), while first questions of other conversations scored far above it (0.95 vs 0.41
    within 0.10, 0.58 vs 0.27 in (0.20, 0.25]). Later questions still retrieve curated chunks like
    any other passage."""
    if any(turn.get("role") == "user" for turn in history):
        return None
    return curated_answer_match(question, collection=collection, max_distance=max_distance,
                                query_embedding=query_embedding)


def curated_reply(match: CuratedMatch, *, question: str, retrieval_ms: float = 0.0, received: float | None = None
                  ) -> Iterator[AnswerEvent]:
    """The events of answering with curated answer ``match``: one ``chat.token`` (its answer followed
    by a marker ``[n]`` per evidence chunk) and ``answer.composed``, whose citations are the evidence
    chunks (``"method": "curated"``), trace the evidence chunks (``vector_distance`` ``None``: they were
    picked by an agent, not retrieved), and
    grounding ``{"method": "curated", "curated_id", "curated_question", "curated_distance" (cosine
    0..2 between ``question`` and the curated question), "query" (``question``), "follow_up": None,
    "question_distance": None, "sentences": [], "removed": 0, "reason"}``. The model is not asked."""
    received = time.perf_counter() if received is None else received
    evidence = match.evidence
    text = f"{clean_markers(match.answer, 0).strip()} " + " ".join(f"[{n}]" for n in range(1, len(evidence) + 1))
    shown_at = _ms(time.perf_counter() - received)
    distance = round(match.distance, 6)
    yield AnswerEvent("chat.token", {"text": text})
    yield AnswerEvent("answer.composed", {"answer": ComposedAnswer(
        text=text, abstained=False, method="curated",
        citations=[{**_citation(n, chunk), "method": "curated"} for n, chunk in enumerate(evidence, start=1)],
        sources=list(evidence),
        trace=[{**entry, "vector_distance": None} for entry in retrieval_trace(evidence)],
        grounding={"method": "curated", "curated_id": match.curated_id, "curated_question": match.question,
                   "curated_distance": distance, "query": question, "follow_up": None, "question_distance": None,
                   "sentences": [],
                   "removed": 0, "reason": "an approved answer to a close question"},
        timings={"retrieval_ms": retrieval_ms, "ttft_ms": shown_at, "first_text_ms": shown_at,
                 "generation_ms": 0.0, "tokens": 0, "tokens_per_s": 0.0},
    )})


def answer_stream(
    conversation_id, question: str, *, cancel: threading.Event | None = None
) -> Iterator[AnswerEvent]:
    """Answer ``question`` in conversation ``conversation_id``: a synchronous generator of
    ``AnswerEvent`` (see the module docstring for the pipeline and the event sequence).

    Side effects: stores the customer message and the assistant message (or, on ``chat.busy``,
    nothing), and for a declined answer the question's embedding (``QuestionEmbedding``), each bumping the conversation's ``updated_at`` and announced to the agents'
    dashboards once committed (``inbox.changed``, kind ``message``; ``chat.notifications``). ``cancel`` (set by the caller, e.g. on websocket disconnect) stops generation at the
    next token; the partial answer is still stored (``timings["cancelled"] = True``) so the transcript
    shows what was sent. Closing the generator early stops the model too, but stores nothing more.
    Timings (ms): ``retrieval_ms``; ``ttft_ms`` from receiving the question to the first streamed
    token (retrieval + queue wait + prompt evaluation); ``generation_ms`` first to last token;
    ``tokens`` streamed completion tokens; ``tokens_per_s`` decode rate.
    """
    received = time.perf_counter()
    cancel = cancel or threading.Event()
    question = (question or "").strip()
    if not question:
        yield AnswerEvent("chat.error", {"message": "Please type a question."})
        return
    if len(question) > settings.WIDGET_MESSAGE_MAX_CHARS:
        yield AnswerEvent("chat.error", {"message": f"Please keep questions under {settings.WIDGET_MESSAGE_MAX_CHARS} characters."})
        return
    try:
        conversation = conversation_get(conversation_id)
    except Conversation.DoesNotExist:
        yield AnswerEvent("chat.error", {"message": "This conversation does not exist."})
        return

    history = conversation_history(conversation)
    # (one more query, only for a short "yes"-like reply)
    offered = could_accept_an_offer(question) and conversation_offered_a_person(conversation)
    user_message = _store_message(conversation, role=Message.Role.USER, text=question)
    if conversation.status in (Conversation.Status.AGENT, Conversation.Status.RESOLVED):
        yield AnswerEvent("chat.agent_active", {"message_id": user_message.pk, "status": conversation.status})
        return
    if asks_for_a_person(question, offered=offered):
        # "I'd like to talk to a person", or "yes" to the decline's offer of one: handed over, as the
        # widget's "Talk to a human" button does; the bot does not answer it.
        conversation = conversation_request_human(conversation)
        yield AnswerEvent("chat.agent_active", {"message_id": user_message.pk, "status": conversation.status})
        return

    composed: ComposedAnswer | None = None
    for event in answer_compose(question, history=history, collection=conversation.collection, cancel=cancel,
                                received=received):
        if event.type == "answer.composed":
            composed = event.data["answer"]
        elif event.type == "chat.busy":
            user_message.delete()  # unanswered: the client sends it again after retry_after_s
            inbox_notify(conversation.pk, "message")
            yield event
            return
        else:
            yield event
    if composed is None:  # chat.error was sent
        return
    message = _store_message(
        conversation, role=Message.Role.ASSISTANT, text=composed.text, abstained=composed.abstained,
        citations=composed.citations, retrieval=composed.trace, timings=composed.timings,
        grounding=composed.grounding, model_version=composed.version,
    )
    if composed.abstained and composed.question_embedding is not None:
        # A content gap: its vector is kept, so the analytics page groups without the model.
        question_embedding_store(user_message.pk, composed.question_embedding)
    yield AnswerEvent("chat.citations", {"citations": [
        {**citation, "title": chunk.source_title, "excerpt": chunk.text[:EXCERPT_MAX_CHARS]}
        for citation, chunk in ((c, composed.sources[c["n"] - 1]) for c in composed.citations)
    ]})
    done = {"message_id": message.pk, "abstained": composed.abstained, "method": composed.method,
            "timings": composed.timings, "text": composed.text}
    if not composed.abstained:
        done["citation_markers"] = composed.citation_markers
    yield AnswerEvent("chat.done", done)
