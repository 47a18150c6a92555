"""Training-data writes: corrections of assistant answers, their review, the stale check, and the
JSONL export of approved corrections.

Flow: an agent writes a correction on an answer (``correction_create``, which snapshots everything
the training example needs); a second agent or an admin approves or rejects it
(``correction_review``); ``corrections_flag_stale`` flags corrections whose sources changed since
(every few minutes on Celery beat, ``tuning.tasks.flag_stale_corrections``, and again right before
each review and each export); ``training_data_export`` writes approved, non-stale corrections as chat
records.

Curated answers: an approved correction with supporting chunks is also written to the knowledge base
as a curated answer (``correction_curate``, through ``knowledge.services``), which the answer pipeline
serves at once to close questions. It leaves the knowledge base in the same transaction as the
correction becomes stale (``corrections_flag_stale``) or rejected (``correction_revoke``).
"""

from __future__ import annotations

import json
from typing import IO, Iterable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.models import Message
from chat.selectors import answered_question
from chat.notifications import inbox_notify
from chat.citations import clean_markers
from knowledge import services as knowledge_services
from knowledge.models import Chunk, Source
from knowledge.selectors import RetrievedChunk, is_follow_up
from tuning.models import Correction

NOT_CURATED_NO_EVIDENCE = (
    "not served as a curated answer: no supporting chunks were picked, so it could not cite its evidence "
    "(write a new correction and tick the passages that support it)"
)
NOT_CURATED_FOLLOW_UP = (
    "not served as a curated answer: the question leans on the conversation before it, so it is not "
    "one customers ask on its own"
)

HISTORY_MAX_TURNS = 10
HISTORY_ROLES = (Message.Role.USER, Message.Role.ASSISTANT, Message.Role.AGENT)


class CorrectionError(ValueError):
    """An invalid correction or review (nothing is stored)."""


def chunk_snapshot(chunk: Chunk) -> dict:
    """What a correction keeps of ``chunk`` (with ``source`` loaded): ``{"chunk_id", "source_id",
    "source_kind", "source_title", "heading_path", "start", "end", "text", "content_hash"}``,
    ``content_hash`` the source's hash now, ``source_kind`` a ``Source.Kind`` value (``curated`` for a
    curated answer, which the embedder's training skips)."""
    return {
        "chunk_id": chunk.pk, "source_id": chunk.source_id, "source_kind": chunk.source.kind,
        "source_title": chunk.source.title or chunk.source.uri,
        "heading_path": list(chunk.heading_path), "start": chunk.start, "end": chunk.end, "text": chunk.text,
        "content_hash": chunk.source.content_hash,
    }


def _chunks_by_id(ids: Iterable[int]) -> dict[int, Chunk]:
    return Chunk.objects.select_related("source").defer("embedding", "search_vector", "source__text").in_bulk(list(ids))


def correction_create(
    message_id: int, *, author, corrected_answer: str, reason: str, supporting_chunk_ids: Iterable[int] = ()
) -> Correction:
    """Store ``author``'s correction of assistant message ``message_id``.

    Snapshots: the original answer, the customer question it answered (the latest user message
    before it), up to ``HISTORY_MAX_TURNS`` earlier customer/assistant/agent turns, the chunks the
    model was shown (the first ``LLM_PROMPT_SOURCES`` of the retrieval trace; none for an
    abstention) and the supporting chunks the agent picked (any chunk ids: retrieved or found by
    search), each via ``chunk_snapshot``. A shown chunk that no longer exists (its source was
    re-ingested) cannot be copied: the correction is then created already ``stale``.

    Raises ``CorrectionError`` (nothing stored) for a message that is not an assistant answer, an
    empty answer, an unknown reason, or a supporting chunk id that does not exist.
    """
    corrected_answer = (corrected_answer or "").strip()
    if not corrected_answer:
        raise CorrectionError("write the corrected answer")
    if reason not in Correction.Reason.values:
        raise CorrectionError(f"unknown reason {reason!r}")
    message = (Message.objects.filter(pk=message_id, role=Message.Role.ASSISTANT)
               .annotate(question_id=answered_question()).select_related("conversation").first())
    if message is None:
        raise CorrectionError("corrections apply to assistant answers only")
    supporting_ids = list(dict.fromkeys(int(i) for i in supporting_chunk_ids))
    earlier = list(
        message.conversation.messages.filter(role__in=HISTORY_ROLES)
        .filter(created_at__lte=message.created_at).exclude(pk=message.pk).order_by("created_at", "id")
    )
    earlier = [m for m in earlier if (m.created_at, m.pk) < (message.created_at, message.pk)]
    question_index = next((i for i, m in enumerate(earlier) if m.pk == message.question_id), None)
    question = earlier[question_index].text if question_index is not None else ""
    history_messages = earlier[:question_index] if question_index is not None else earlier
    history = [{"role": m.role, "text": m.text} for m in history_messages[-HISTORY_MAX_TURNS:]]

    shown_ids = [] if message.abstained else [e["chunk_id"] for e in message.retrieval[: settings.LLM_PROMPT_SOURCES]]
    chunks = _chunks_by_id([*shown_ids, *supporting_ids])
    missing_support = [i for i in supporting_ids if i not in chunks]
    if missing_support:
        raise CorrectionError(f"unknown chunk ids {missing_support}")
    missing_shown = [i for i in shown_ids if i not in chunks]
    correction = Correction.objects.create(
        message=message, author=author, reason=reason, corrected_answer=corrected_answer,
        original_answer=message.text, question=question, history=history,
        shown_chunks=[chunk_snapshot(chunks[i]) for i in shown_ids if i in chunks],
        supporting_chunks=[chunk_snapshot(chunks[i]) for i in supporting_ids],
        stale=bool(missing_shown),
        stale_reason=f"chunks {missing_shown} shown to the model no longer exist" if missing_shown else "",
    )
    inbox_notify(message.conversation_id, "correction")
    return correction


def correction_review(correction_id: int, *, reviewer, approve: bool, note: str = "") -> Correction:
    """Approve (``approve=True``) or reject a pending correction as ``reviewer`` (who must not be its
    author; the caller checks that ``reviewer`` is an agent or staff).

    Staleness is checked again first (``corrections_flag_stale`` for this correction): a source
    that changed since the correction was written, even if the periodic check has not run yet,
    flags it stale, and a stale correction cannot be approved.

    Atomic: a conditional update on ``status="pending"``, so two reviewers cannot both decide.
    Approving also makes it a curated answer in the same transaction (``correction_curate``).
    Raises ``CorrectionError`` when the reviewer is the author, the correction is no longer pending,
    or approving a stale correction; its status, reviewer and note are then unchanged (only the
    stale flag may have been set). ``Correction.DoesNotExist`` for an unknown id.
    """
    correction = Correction.objects.get(pk=correction_id)
    if correction.author_id == reviewer.pk:
        raise CorrectionError("a correction is reviewed by someone other than its author")
    if corrections_flag_stale(correction_ids=[correction.pk]):
        correction.refresh_from_db()
    if approve and correction.stale:
        raise CorrectionError("this correction is stale: its sources changed; write a new one")
    status = Correction.Status.APPROVED if approve else Correction.Status.REJECTED
    with transaction.atomic():
        updated = Correction.objects.filter(pk=correction_id, status=Correction.Status.PENDING).update(
            status=status, reviewer=reviewer, reviewed_at=timezone.now(), review_note=(note or "").strip()
        )
        if not updated:
            raise CorrectionError("this correction was already reviewed")
        correction.refresh_from_db()
        correction_curate(correction)
    inbox_notify(correction.message.conversation_id, "correction")
    return correction


def curated_key(correction_id: int) -> str:
    """The key of correction ``correction_id``'s curated answer in the knowledge base."""
    return f"correction:{correction_id}"


def _curated_remove(correction_id: int, note: str) -> None:
    """Delete correction ``correction_id``'s curated answer (if any) and record ``note``; the caller
    holds the transaction."""
    knowledge_services.curated_answer_delete(key=curated_key(correction_id))
    Correction.objects.filter(pk=correction_id).update(curated_answer=None, curation_note=note)


def correction_curate(correction: Correction):
    """Make approved ``correction`` a curated answer of its conversation's collection: the question,
    the corrected answer (citation markers removed: they numbered the sources the model was shown)
    and the supporting chunks as evidence (``knowledge.services.curated_answer_put``, key
    ``correction:<id>``). A pending, rejected or stale correction has none (an existing one is
    deleted). Not curated, with the reason in ``curation_note``: no supporting chunks, a question
    that leans on the conversation before it (``knowledge.selectors.is_follow_up`` with history), or
    evidence the knowledge base refuses (changed since). Atomic. Returns the
    ``knowledge.models.CuratedAnswer`` or ``None``."""
    def not_curated(note: str) -> None:
        _curated_remove(correction.pk, note)
        correction.curated_answer, correction.curation_note = None, note

    with transaction.atomic():
        if correction.status != Correction.Status.APPROVED or correction.stale:
            not_curated("" if correction.status == Correction.Status.PENDING else
                        f"not served as a curated answer: {'stale' if correction.stale else correction.status}")
            return None
        note = ""
        if not correction.supporting_chunks:
            note = NOT_CURATED_NO_EVIDENCE
        elif correction.history and is_follow_up(correction.question):
            note = NOT_CURATED_FOLLOW_UP
        if note:
            not_curated(note)
            return None
        try:
            with transaction.atomic():
                curated = knowledge_services.curated_answer_put(
                    key=curated_key(correction.pk), collection=correction.message.conversation.collection,
                    question=correction.question, answer=clean_markers(correction.corrected_answer, 0),
                    evidence=[{"source_id": s["source_id"], "start": s["start"], "end": s["end"],
                               "content_hash": s["content_hash"]} for s in correction.supporting_chunks],
                )
        except knowledge_services.CuratedAnswerError as error:
            not_curated(f"not served as a curated answer: {error}")
            return None
        Correction.objects.filter(pk=correction.pk).update(curated_answer=curated, curation_note="")
        correction.curated_answer, correction.curation_note = curated, ""
        return curated


def correction_revoke(correction_id: int, *, reviewer, note: str = "") -> Correction:
    """Reject an approved correction after the fact (``reviewer`` must not be its author): status
    ``rejected``, and its curated answer leaves the knowledge base in the same transaction. Raises
    ``CorrectionError`` (nothing changed) when the reviewer is the author or it is not approved;
    ``Correction.DoesNotExist`` for an unknown id."""
    correction = Correction.objects.get(pk=correction_id)
    if correction.author_id is not None and correction.author_id == reviewer.pk:
        raise CorrectionError("a correction is reviewed by someone other than its author")
    with transaction.atomic():
        updated = Correction.objects.filter(pk=correction_id, status=Correction.Status.APPROVED).update(
            status=Correction.Status.REJECTED, reviewer=reviewer, reviewed_at=timezone.now(),
            review_note=(note or "").strip(),
        )
        if not updated:
            raise CorrectionError("only an approved correction can be withdrawn")
        _curated_remove(correction_id, "not served as a curated answer: rejected")
    correction.refresh_from_db()
    inbox_notify(correction.message.conversation_id, "correction")
    return correction


def correction_stale_reason(correction: Correction, current_hashes: dict[int, str]) -> str:
    """Why ``correction`` is stale given ``current_hashes`` (``{source_id: content_hash}`` of the
    sources that exist), or ``""`` when every source of its chunks still has the recorded hash."""
    reasons = []
    for snapshot in [*correction.shown_chunks, *correction.supporting_chunks]:
        source_id = snapshot["source_id"]
        if source_id not in current_hashes:
            reasons.append(f"source {source_id} was deleted")
        elif current_hashes[source_id] != snapshot["content_hash"]:
            reasons.append(f"source {source_id} changed")
    return "; ".join(dict.fromkeys(reasons))


def corrections_flag_stale(*, source_ids: Iterable[int] | None = None,
                           correction_ids: Iterable[int] | None = None) -> int:
    """Flag as ``stale`` every non-rejected, not yet stale correction whose chunks come from a source
    whose ``content_hash`` differs from the recorded one (or that was deleted), with the reason in
    ``stale_reason``. ``source_ids`` restricts the check to corrections citing those sources (e.g.
    right after they were ingested), ``correction_ids`` to those corrections (e.g. the one being
    reviewed). Returns how many corrections were flagged. Safe to run any time, twice, and
    concurrently: each flag is a conditional update on ``stale=False``.

    Called by the periodic task ``tuning.tasks.flag_stale_corrections``, by ``correction_review``
    before a decision and by ``training_data_export`` before writing."""
    candidates = Correction.objects.exclude(status=Correction.Status.REJECTED).filter(stale=False)
    if correction_ids is not None:
        candidates = candidates.filter(pk__in=list(correction_ids))
    corrections = list(candidates.only("pk", "shown_chunks", "supporting_chunks"))
    wanted = set(source_ids) if source_ids is not None else None
    if wanted is not None:
        corrections = [
            c for c in corrections
            if wanted & {s["source_id"] for s in [*c.shown_chunks, *c.supporting_chunks]}
        ]
    all_ids = {s["source_id"] for c in corrections for s in [*c.shown_chunks, *c.supporting_chunks]}
    current = dict(Source.objects.filter(pk__in=all_ids).values_list("pk", "content_hash"))
    flagged = 0
    for correction in corrections:
        reason = correction_stale_reason(correction, current)
        if reason:
            with transaction.atomic():
                changed = Correction.objects.filter(pk=correction.pk, stale=False).update(stale=True, stale_reason=reason)
                if changed:
                    _curated_remove(correction.pk, f"not served as a curated answer: stale ({reason})")
            flagged += changed
    return flagged


def _as_retrieved(snapshot: dict) -> RetrievedChunk:
    return RetrievedChunk(
        chunk_id=snapshot["chunk_id"], source_id=snapshot["source_id"], source_uri="",
        source_title=snapshot.get("source_title", ""), collection="", ordinal=0,
        start=snapshot["start"], end=snapshot["end"], text=snapshot["text"],
        heading_path=list(snapshot.get("heading_path") or []),
    )


def correction_sources(correction: Correction) -> list[dict]:
    """The numbered sources of the training prompt: the chunks shown to the model (``[1]..[n]`` as the
    model saw them, so the original citations keep their numbers), then supporting chunks not among
    them."""
    shown = list(correction.shown_chunks)
    shown_ids = {s["chunk_id"] for s in shown}
    return shown + [s for s in correction.supporting_chunks if s["chunk_id"] not in shown_ids]


def training_record(correction: Correction) -> dict:
    """One chat record for fine-tuning: ``{"messages": [serving prompt, corrected assistant answer],
    "metadata": {...}}``, built by the same code as a dataset snapshot's examples
    (``tuning.datasets.raft_example`` with the settings' recipe, gold always kept), so what is
    exported is what is trained on and what the bot is served: ``chat.prompts.grounded_messages`` with
    at most ``LLM_PROMPT_SOURCES`` sources (the gold, then the chunks retrieval showed),
    ``LLM_SOURCE_MAX_CHARS`` per source, the question and the instruction, and the answer's ``[n]``
    markers renumbered to those sources. Earlier turns are not in the prompt, as in serving, where
    they only shape the retrieval query; they are kept in ``metadata["history"]``."""
    from tuning.datasets import RaftRecipe, raft_example

    record = raft_example(correction, RaftRecipe.from_settings(), heldout=True)["record"]
    record["metadata"]["message_id"] = correction.message_id
    return record


def training_data_export(output: IO[str]) -> int:
    """Write every approved, non-stale correction (oldest first) to ``output`` as JSONL
    (``training_record``, one per line, UTF-8 text). Runs ``corrections_flag_stale`` first, so a
    source changed since the correction was approved keeps it out. Returns the number written."""
    corrections_flag_stale()
    written = 0
    for correction in Correction.objects.filter(status=Correction.Status.APPROVED, stale=False).order_by("created_at", "id"):
        output.write(json.dumps(training_record(correction), ensure_ascii=False) + "\n")
        written += 1
    return written
