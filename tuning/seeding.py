"""Seeded training data: approved corrections built from a question file with reference passages, so
the tuning loop can run end to end on a fresh install before agents have corrected anything.

For each question (Doc2Dial's format, ``knowledge.evaluation.load_questions``): retrieval runs as in
serving (``conversation_search``: the history only for follow-ups, ``RETRIEVAL_K`` chunks of ``collection``);
the supporting chunks are the chunks of the gold page overlapping the gold span
``[answer_start, answer_end)``; the corrected answer is the reference answer. A conversation holding
the history, the question and an empty assistant answer carrying the real retrieval trace is stored
with it, so a seeded correction has exactly the fields an agent's correction has (``seeded=True``,
no author or reviewer). Questions from an "unanswerable" list get no supporting chunks and the
abstention answer (reason "missing from knowledge base"). Seeding the same question twice adds
nothing (``seed_key``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.models import Conversation, Message
from chat.services import ABSTAIN_MESSAGE, retrieval_trace
from knowledge.evaluation import GoldQuestion
from knowledge.models import Chunk, Source
from knowledge.selectors import conversation_search
from tuning.models import Correction
from tuning.services import chunk_snapshot, correction_curate

SEED_ORIGIN = "seed_training_data"


@dataclass
class SeedReport:
    """What ``training_data_seed`` did: ``created`` corrections (``curated`` of them became curated
    answers), ``existing`` (already seeded), ``skipped`` with the reason per question id."""

    created: int = 0
    curated: int = 0
    existing: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def question_lines(text: str) -> list[str]:
    """The questions of a plain-text question file: one per line, blank lines and lines starting
    with ``#`` (comments) left out, each stripped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dialogue_of(question: GoldQuestion) -> str:
    """The dialogue a question belongs to: its qid up to the last ``_`` (Doc2Dial's ``<dial_id>_<turn>``)."""
    return question.qid.rsplit("_", 1)[0]


def _sources_by_relative_path(collection: str, root: Path) -> dict[str, int]:
    found = {}
    for source_id, uri in Source.objects.filter(collection=collection, status=Source.Status.READY).values_list("pk", "uri"):
        try:
            found[str(Path(uri).resolve().relative_to(root))] = source_id
        except ValueError:
            continue
    return found


def _seed_one(*, key: str, group: str, question: str, history: list[dict], collection: str, answer: str,
              reason: str, supporting: list[Chunk], curate: bool = True) -> Correction:
    retrieved = conversation_search(question, history, k=settings.RETRIEVAL_K, collection=collection).chunks
    shown_ids = [c.chunk_id for c in retrieved[: settings.LLM_PROMPT_SOURCES]]
    shown = Chunk.objects.select_related("source").defer("embedding", "search_vector", "source__text").in_bulk(shown_ids)
    now = timezone.now()
    with transaction.atomic():
        conversation = Conversation.objects.create(
            collection=collection, origin=SEED_ORIGIN, status=Conversation.Status.RESOLVED, reviewed_at=now
        )
        Message.objects.bulk_create([
            Message(conversation=conversation, role=Message.Role.USER if t.get("role") == "user" else Message.Role.AGENT,
                    text=t.get("text", ""))
            for t in history
        ] + [Message(conversation=conversation, role=Message.Role.USER, text=question)])
        message = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, text="",
            retrieval=retrieval_trace(retrieved),
        )
        correction = Correction.objects.create(
            message=message, author=None, reason=reason, corrected_answer=answer, original_answer="",
            question=question, history=[{"role": t.get("role", "user"), "text": t.get("text", "")} for t in history],
            shown_chunks=[chunk_snapshot(shown[i]) for i in shown_ids if i in shown],
            supporting_chunks=[chunk_snapshot(c) for c in supporting],
            status=Correction.Status.APPROVED, reviewed_at=now, seeded=True, seed_key=key, seed_group=group,
            review_note="seeded from a question file with reference passages",
        )
        if curate:
            correction_curate(correction)
        return correction


def training_data_seed(
    questions: list[GoldQuestion], *, docs_root: str | Path, collection: str, unanswerable: list[str] = (),
    max_supporting: int = 2, curate: bool = True,
) -> SeedReport:
    """Store an approved, seeded correction for each of ``questions`` (gold pages must be ingested in
    ``collection``; ``gold_file`` paths are relative to ``docs_root``) and for each ``unanswerable``
    question text.

    A question is skipped (with the reason in the report) when its gold page is not in the collection,
    no chunk overlaps its gold span, or it has no reference answer. The question's dialogue (the qid
    up to its last ``_``) is its ``seed_group``. Up to ``max_supporting`` gold chunks (in text order)
    are kept as support. Like an approved agent correction, each becomes a curated answer when it
    can (``tuning.services.correction_curate``), unless ``curate=False``.
    """
    root = Path(docs_root).resolve()
    report = SeedReport()
    sources = _sources_by_relative_path(collection, root)
    existing = set(Correction.objects.filter(seeded=True).values_list("seed_key", flat=True))
    for question in questions:
        key = f"{collection}:{question.qid}"
        if key in existing:
            report.existing += 1
            continue
        answer = " ".join(question.reference_answer.split())
        if not answer:
            report.skipped[question.qid] = "no reference answer"
            continue
        source_id = sources.get(question.gold_file)
        if source_id is None:
            report.skipped[question.qid] = "gold page not in the collection"
            continue
        gold = list(
            Chunk.objects.select_related("source").defer("embedding", "search_vector", "source__text")
            .filter(source_id=source_id, start__lt=question.answer_end, end__gt=question.answer_start)
            .order_by("start")[:max_supporting]
        )
        if not gold:
            report.skipped[question.qid] = "no chunk overlaps the gold span"
            continue
        group = dialogue_of(question)
        correction = _seed_one(key=key, group=group, question=question.question, history=list(question.history),
                               collection=collection, answer=answer, reason=Correction.Reason.WRONG_FACT,
                               supporting=gold, curate=curate)
        report.created += 1
        report.curated += correction.curated_answer_id is not None
    for text in unanswerable:
        text = " ".join(text.split())
        if not text:
            continue
        key = f"{collection}:unanswerable:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        if key in existing:
            report.existing += 1
            continue
        _seed_one(key=key, group=key, question=text, history=[], collection=collection, answer=ABSTAIN_MESSAGE,
                  reason=Correction.Reason.MISSING_FROM_KB, supporting=[], curate=curate)
        report.created += 1
    return report
