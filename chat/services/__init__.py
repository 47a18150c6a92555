"""Chat writes, one module per concern:

- ``chat.services.conversations``: starting a conversation, handoff to a human, storing messages, and
  the fixed texts customers are shown (``ABSTAIN_MESSAGE``, ``HANDOFF_MESSAGE``, ``BUSY_MESSAGE``...);
- ``chat.services.model_versions``: the registry of model versions (register, verify, refuse,
  activate, the active one) and the engine serving a version; tuning promotes and rolls back
  through it;
- ``chat.services.answers``: the answer pipeline, ``answer_stream`` (its module docstring describes
  every step and the event sequence), and ``answer_compose``, its steps without storing anything,
  which evaluations and benchmarks call;
- ``chat.services.question_embeddings``: the stored vectors of the questions the assistant could
  not answer (recorded by the pipeline, backfilled by a Celery task), which the analytics page reads;
- ``chat.services.streaming``: ``answer_events``, the same pipeline for asyncio code (consumers), at
  most ``ANSWER_MAX_CONCURRENT`` at once per process (``chat.busy`` past that).

The answer pipeline, for one customer question (in full in ``chat.services.answers``): persist the
question (a conversation an agent holds, or a resolved one, stops there: ``chat.agent_active``; so
does a request for a person, which hands the conversation over);
answer a first question close to a curated answer with that answer; otherwise retrieve, abstain with
``ABSTAIN_MESSAGE`` when the closest chunk is farther than ``ABSTAIN_MAX_DISTANCE``, prompt the
model with the best chunks as numbered sources, show only the sentences the groundedness check
accepts (or quote a source sentence, or decline), and persist the answer with its retrieval trace,
check record, citations, model version and timings. Events: ``chat.token`` (zero or more),
``chat.citations``, ``chat.done``; or instead one of ``chat.busy``, ``chat.agent_active``,
``chat.error``.

Import from the package, not the modules: ``from chat.services import answer_stream``, or
``from chat import services`` and ``services.answer_stream(...)``. Every public name is re-exported
here. Interfaces call ``services.answer_events`` on the package at call time, so a test replaces it
with ``monkeypatch.setattr("chat.services.answer_events", fake)``; a name used inside a module (say
``answer_stream`` inside ``answer_events``) is replaced in that module.
"""

from __future__ import annotations

from chat.model_files import file_sha256
from chat.services.answers import (
    EXCERPT_MAX_CHARS,
    AnswerEvent,
    ComposedAnswer,
    answer_compose,
    answer_stream,
    best_vector_distance,
    closest_among_sources,
    curated_lookup,
    curated_reply,
    retrieval_trace,
    should_abstain,
    small_talk_reply,
)
from chat.services.conversations import (
    ABSTAIN_MESSAGE,
    AGENT_ACTIVE_MESSAGE,
    BUSY_MESSAGE,
    CUSTOMER_HANDOFF_MESSAGE,
    HANDOFF_MESSAGE,
    SMALL_TALK_REPLIES,
    conversation_request_human,
    conversation_start,
    widget_site_identity_secret_rotate,
)
from chat.services.model_versions import (
    ACTIVATION_LOCK_ID,
    engine_for,
    engine_serving,
    model_key,
    model_version_activate,
    model_version_active,
    model_version_refuse,
    model_version_register,
    model_version_server_check,
    model_version_verify,
)
from chat.services.question_embeddings import (
    question_embedding_store,
    questions_without_embedding,
    unanswered_questions_embed,
)
from chat.services.streaming import answer_events

__all__ = [
    # conversations
    "ABSTAIN_MESSAGE",
    "AGENT_ACTIVE_MESSAGE",
    "BUSY_MESSAGE",
    "CUSTOMER_HANDOFF_MESSAGE",
    "HANDOFF_MESSAGE",
    "SMALL_TALK_REPLIES",
    "conversation_request_human",
    "conversation_start",
    # model versions
    "ACTIVATION_LOCK_ID",
    "engine_for",
    "engine_serving",
    "file_sha256",  # chat.model_files', re-exported: tuning and the model server import it from here
    "model_key",
    "model_version_activate",
    "model_version_active",
    "model_version_refuse",
    "model_version_register",
    "model_version_server_check",
    "model_version_verify",
    # the answer pipeline
    "EXCERPT_MAX_CHARS",
    "AnswerEvent",
    "ComposedAnswer",
    "answer_compose",
    "answer_stream",
    "best_vector_distance",
    "closest_among_sources",
    "curated_lookup",
    "curated_reply",
    "retrieval_trace",
    "should_abstain",
    "small_talk_reply",
    # its asyncio bridge
    "answer_events",
    # question embeddings (content gaps)
    "question_embedding_store",
    "questions_without_embedding",
    "unanswered_questions_embed",
]
